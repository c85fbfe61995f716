"""Every registered op (torch.ops.tritongpt.*) against torch.library.opcheck: its schema, its
fake impl's shapes, strides and dtypes against the real run, and AOT dispatch with dynamic shapes
-- what torch.compile relies on. The public functions' parity tests live beside each kernel."""
import pytest
import torch

import tritongpt.kernels.attention  # noqa: F401  (registers the ops)
import tritongpt.kernels.cross_entropy  # noqa: F401
import tritongpt.kernels.jsd  # noqa: F401
import tritongpt.kernels.layernorm  # noqa: F401
import tritongpt.kernels.lora  # noqa: F401
import tritongpt.kernels.mlp  # noqa: F401
import tritongpt.kernels.moe  # noqa: F401
import tritongpt.kernels.quant  # noqa: F401
import tritongpt.kernels.rope  # noqa: F401
import tritongpt.kernels.sampling  # noqa: F401
import tritongpt.kernels.swiglu  # noqa: F401
import tritongpt.kernels.token_mask  # noqa: F401

ops = torch.ops.tritongpt


def _randn(*shape, device, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype).to(device)


def _layer_norm_args(device, gen):
    x, w, b = (_randn(*shape, device=device, gen=gen) for shape in ((7, 24), (24,), (24,)))
    y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-5)
    d = _randn(7, 24, device=device, gen=gen, dtype=torch.bfloat16)  # an fp32 stream + a bf16 sublayer
    s, _, s_mean, s_rstd = ops.add_layer_norm_fwd(x, d, w, b, 1e-5)
    return {"layer_norm_fwd": (x, w, b, 1e-5), "layer_norm_bwd": (torch.randn_like(y), x, w, mean, rstd),
            "add_layer_norm_fwd": (x, d, w, b, 1e-5),
            # a half stream and an fp32 delta: s and y in fp32, the promoted dtype, not x's
            "add_layer_norm_fwd fp16+fp32": (x.half(), d.float(), w, b, 1e-5),
            "layer_norm_bwd ds": (torch.randn_like(s), s, w, s_mean, s_rstd, torch.randn_like(s)),
            "add_layer_norm_bwd": (torch.randn_like(s), s, w, s_mean, s_rstd, torch.randn_like(s), torch.bfloat16),
            "add_layer_norm_bwd no ds": (torch.randn_like(s), s, w, s_mean, s_rstd, None, torch.float16)}


def _rms_norm_args(device, gen):
    x, w = _randn(7, 24, device=device, gen=gen), _randn(24, device=device, gen=gen)
    y, rstd = ops.rms_norm_fwd(x, w, 1e-5)
    d = _randn(7, 24, device=device, gen=gen, dtype=torch.bfloat16)  # an fp32 stream + a bf16 sublayer
    s, _, s_rstd = ops.add_rms_norm_fwd(x, d, w, 1e-5)
    return {"rms_norm_fwd": (x, w, 1e-5), "rms_norm_fwd bf16 x, fp32 weight": (x.bfloat16(), w, 1e-5),
            "rms_norm_bwd": (torch.randn_like(y), x, w, rstd),
            # the weight's gradient in the weight's dtype, as the fake impl says
            "rms_norm_bwd bf16 weight": (torch.randn_like(y), x, w.bfloat16(), rstd),
            "add_rms_norm_fwd": (x, d, w, 1e-5), "add_rms_norm_fwd fp16+fp32": (x.half(), d.float(), w, 1e-5),
            "rms_norm_bwd ds": (torch.randn_like(s), s, w, s_rstd, torch.randn_like(s)),
            "add_rms_norm_bwd": (torch.randn_like(s), s, w, s_rstd, torch.randn_like(s), torch.bfloat16),
            "add_rms_norm_bwd no ds": (torch.randn_like(s), s, w, s_rstd, None, torch.float16)}


def _mlp_args(device, gen):
    shapes = ((5, 12), (20, 12), (20,), (12, 20), (12,))
    x, w1, b1, w2, b2 = (_randn(*shape, device=device, gen=gen) for shape in shapes)
    y, h = ops.gelu_mlp_fwd(x, w1, b1, w2, b2)
    return {"gelu_mlp_fwd": (x, w1, b1, w2, b2),
            "gelu_mlp_bwd": (torch.randn_like(y), x, h, w1, w2, [True, True, True, False, True]),
            # dh's epilogue storing a for dW2 (STORE_ACT), and W1 frozen with no dx: no dh launch (B_GELU)
            "gelu_mlp_bwd every gradient": (torch.randn_like(y), x, h, w1, w2, [True] * 5),
            "gelu_mlp_bwd frozen w1": (torch.randn_like(y), x, h, w1, w2, [False, False, False, True, True])}


def _swiglu_args(device, gen):
    shapes = ((5, 12), (20, 12), (20,), (20, 12), (20,), (12, 20), (12,))
    x, wg, bg, wu, bu, wd, bd = (_randn(*shape, device=device, gen=gen) for shape in shapes)
    y, g, u = ops.swiglu_mlp_fwd(x, wg, bg, wu, bu, wd, bd)
    return {"swiglu_mlp_fwd": (x, wg, bg, wu, bu, wd, bd),
            "swiglu_mlp_fwd no bias": (x, wg, None, wu, None, wd, None),
            "swiglu_mlp_bwd": (torch.randn_like(y), x, g, u, wg, wu, wd, [True, True, False, True, True, False, True]),
            # GeGLU: the activation, a str argument of both ops
            "swiglu_mlp_fwd gelu": (x, wg, bg, wu, None, wd, bd, "gelu"),
            "swiglu_mlp_bwd gelu": (torch.randn_like(y), x, g, u, wg, wu, wd, [True] * 7, "gelu")}


def _moe_args(device, gen):
    # 9 tokens, 3 experts (expert 2 idle), k 2; int32 ids once (the router's are int64)
    x, wg, wu, wd = (_randn(*shape, device=device, gen=gen) for shape in ((9, 12), (3, 20, 12), (3, 20, 12),
                                                                          (3, 12, 20)))
    experts = torch.stack([torch.randperm(2, generator=gen) for _ in range(9)]).to(device)
    y, g, u, order, offsets = ops.moe_mlp_fwd(x, experts, wg, wu, wd)
    saved = (experts, g, u, order, offsets, wg, wu, wd)
    # GPT-OSS's experts: the biases (optional tensors), the clamped SwiGLU and its limit and alpha (float arguments)
    biases = tuple(_randn(*shape, device=device, gen=gen) for shape in ((3, 20), (3, 20), (3, 12)))
    oss = ("gpt_oss", *biases, 0.5, 1.702)
    _, g2, u2, _, _ = ops.moe_mlp_fwd(x, experts, wg, wu, wd, *oss)
    return {"moe_mlp_fwd": (x, experts, wg, wu, wd), "moe_mlp_fwd int32 gelu": (x, experts.int(), wg, wu, wd, "gelu"),
            "moe_mlp_bwd": (torch.randn_like(y), x, *saved, [True] * 4),
            "moe_mlp_bwd frozen w_up": (torch.randn_like(y), x, *saved, [True, True, False, True], "gelu"),
            "moe_mlp_fwd gpt_oss": (x, experts, wg, wu, wd, *oss),
            "moe_mlp_bwd gpt_oss": (torch.randn_like(y), x, experts, g2, u2, *saved[3:], [True, True, False, True,
                                                                                     True, False, True],
                                    "gpt_oss", 0.5, 1.702)}


def _moe_mxfp4_args(device, gen):
    # GPT-OSS's experts kept MXFP4: 7 tokens, 3 experts, k 2, C 32 and H 32 (one block of 32 each)
    x = _randn(7, 32, device=device, gen=gen)
    experts = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(7)]).to(device)
    u8 = dict(dtype=torch.uint8, generator=gen)
    gub, dnb = (torch.randint(0, 256, (3, rows, 1, 16), **u8).to(device) for rows in (64, 32))
    gus, dns = (torch.randint(120, 130, (3, rows, 1), **u8).to(device) for rows in (64, 32))
    biases = tuple(_randn(*shape, device=device, gen=gen) for shape in ((3, 32), (3, 32), (3, 32)))
    packed = (gub, gus, dnb, dns)
    y, g, u, order, offsets = ops.moe_mlp_mxfp4_fwd(x, experts, *packed, "gpt_oss", *biases, 0.5, 1.702)
    return {"moe_mlp_mxfp4_fwd": (x, experts, *packed, "gpt_oss", *biases, 0.5, 1.702),
            "moe_mlp_mxfp4_bwd": (torch.randn_like(y), x, experts, g, u, order, offsets, *packed, "gpt_oss", 0.5,
                                  1.702)}


def _cross_entropy_args(device, gen):
    logits = _randn(6, 40, device=device, gen=gen)
    t = torch.randint(0, 37, (6,), generator=gen).to(device)
    t[3] = -100
    loss, row_max, log_sum, _ = ops.cross_entropy_fwd(logits, t, -100, 37)  # 3 padding columns
    # RL's: a temperature and the entropy (a fourth output), whose gradient backward adds
    _, max_t, sum_t, ent = ops.cross_entropy_fwd(logits, t, -100, 37, 0.0, 0.0, 0.0, 0.7, True)
    return {"checked_targets": (t.int(), 37, -100), "cross_entropy_fwd": (logits, t, -100, 37),
            "cross_entropy_bwd": (_randn(6, device=device, gen=gen), logits, t, row_max, log_sum, -100, 37),
            # label smoothing and the z-loss: two more schema arguments, and their kernel variants
            "cross_entropy_fwd smoothed+z": (logits, t, -100, 37, 0.1, 1e-2),
            "cross_entropy_bwd smoothed+z": (_randn(6, device=device, gen=gen), logits, t, row_max, log_sum, -100,
                                             37, 0.1, 1e-2),
            "cross_entropy_fwd softcap": (logits, t, -100, 37, 0.0, 0.0, 2.0),
            "cross_entropy_bwd softcap": (_randn(6, device=device, gen=gen), logits, t, row_max, log_sum, -100,
                                          37, 0.0, 0.0, 2.0),
            "cross_entropy_fwd temperature+entropy": (logits, t, -100, 37, 0.0, 0.0, 0.0, 0.7, True),
            "cross_entropy_bwd temperature+entropy": (_randn(6, device=device, gen=gen), logits, t, max_t, sum_t,
                                                      -100, 37, 0.0, 0.0, 0.0, 0.7,
                                                      _randn(6, device=device, gen=gen), ent)}


def _attention_args(device, gen):
    q, k, v = (_randn(1, 2, 9, 16, device=device, gen=gen) for _ in range(3))
    seed = torch.tensor(3, device=device)
    o, lse = ops.flash_attn_fwd(q, k, v, True, 0.25, 0.1, seed)
    q4 = _randn(1, 4, 9, 16, device=device, gen=gen)  # grouped-query: 4 query heads over k's and v's 2
    o4, lse4 = ops.flash_attn_fwd(q4, k, v, True, 0.25, 0.1, seed)
    # Gemma 2's soft cap: the last schema argument, after the (absent) document bounds
    oc, lsec = ops.flash_attn_fwd(q4, k, v, True, 0.25, 0.1, seed, None, None, 2.0)
    # ALiBi's slopes, fp32 [H]: the schema argument after the soft cap
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=device)
    oa, lsea = ops.flash_attn_fwd(q4, k, v, True, 0.25, 0.1, seed, None, None, 0.0, slopes)
    # gpt-oss's attention sinks, float [H]: the 16th schema argument, after the (absent) cache ones; the backward
    # returns their gradient as a fourth output
    sinks = _randn(4, device=device, gen=gen)
    cache_none = (None,) * 4  # kv_len, k_scale, v_scale, block_table
    os_, lses = ops.flash_attn_fwd(q4, k, v, True, 0.25, 0.1, seed, None, None, 0.0, None, *cache_none, sinks)
    return {"flash_attn_fwd": (q, k, v, True, 0.25, 0.1, seed),
            "flash_attn_bwd": (torch.randn_like(o), q, k, v, o, lse, True, 0.25, 0.1, seed),
            "flash_attn_fwd gqa": (q4, k, v, True, 0.25, 0.1, seed),
            "flash_attn_bwd gqa": (torch.randn_like(o4), q4, k, v, o4, lse4, True, 0.25, 0.1, seed),
            "flash_attn_fwd softcap": (q4, k, v, True, 0.25, 0.1, seed, None, None, 2.0),
            "flash_attn_bwd softcap": (torch.randn_like(oc), q4, k, v, oc, lsec, True, 0.25, 0.1, seed, None, None,
                                       2.0),
            "flash_attn_fwd alibi": (q4, k, v, True, 0.25, 0.1, seed, None, None, 0.0, slopes),
            "flash_attn_bwd alibi": (torch.randn_like(oa), q4, k, v, oa, lsea, True, 0.25, 0.1, seed, None, None,
                                     0.0, slopes),
            "flash_attn_fwd sinks": (q4, k, v, True, 0.25, 0.1, seed, None, None, 0.0, None, *cache_none, sinks),
            "flash_attn_bwd sinks": (torch.randn_like(os_), q4, k, v, os_, lses, True, 0.25, 0.1, seed, None, None,
                                     0.0, None, sinks)}


def _rope_args(device, gen):
    # q a transposed view (the projection's), k contiguous, positions per token and expanded (stride 0)
    q = _randn(2, 7, 3, 16, device=device, gen=gen).transpose(1, 2)
    k = _randn(2, 3, 7, 16, device=device, gen=gen)
    per_token = torch.randint(0, 9, (2, 7), generator=gen).to(device)
    shared = torch.arange(4, 11, device=device).expand(2, 7)
    from tritongpt.model.layers import rope_inv_freq

    inv_freq, llama3 = rope_inv_freq(16, 10000.0, device), rope_inv_freq(16, 500.0, device, {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    partial = rope_inv_freq(6, 10000.0, device)  # rotary_dim 6 of 16: three pairs, ten columns passed through
    return {"rope_fwd": (q, k, per_token, inv_freq), "rope_fwd shared": (q, k, shared, llama3),
            "rope_bwd": (q.bfloat16(), k.bfloat16(), per_token.int(), inv_freq),
            "rope_fwd partial": (q, k, per_token, partial, 6),
            "rope_bwd partial": (q.bfloat16(), k.bfloat16(), shared, partial, 6)}


def _distill_args(device, gen):
    # student logits 45 wide (the CE over 41), the teacher's 40 (the divergence over 37); the op writes the
    # gradient over the student's logits, which opcheck checks it declares (mutates_args)
    x, y = _randn(7, 45, device=device, gen=gen), _randn(7, 40, device=device, gen=gen)
    t = torch.randint(0, 41, (7,), generator=gen).to(device)
    t[2] = -100
    return {"distill_fwd": (x, y, t, -100, 41, 37, 2.0, 0.0, 0.6, 0.8, True),
            "distill_fwd mixture": (x, y, t.int(), -100, 41, 37, 1.0, 0.3, 0.6, 0.4, True),
            "distill_fwd no grad": (x.bfloat16(), y, t, -100, 41, 37, 2.0, 1.0, 0.6, 0.8, False)}


def _int8_linear_args(device, gen):
    # N 130 and K 100: no multiple of the tiles; the weight int8 [N, K] with one fp32 scale a row
    x, w = _randn(9, 100, device=device, gen=gen), _randn(130, 100, device=device, gen=gen)
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    b = _randn(130, device=device, gen=gen)
    dy = _randn(9, 130, device=device, gen=gen)
    return {"int8_linear": (x, q, scale, b, "gelu_tanh"),
            "int8_linear bf16 no bias": (x.bfloat16(), q, scale, None, None),
            "int8_linear x requires grad": (x.clone().requires_grad_(), q, scale, b, None),
            "int8_linear_dx": (dy, q, scale), "int8_linear_dx bf16": (dy.bfloat16(), q, scale)}


def _int4_linear_args(device, gen):
    # N 130 and K 96: no multiple of the tiles; G 32 (3 groups) and G 16 (6)
    from tritongpt.model.quant import quantize_weight_int4

    x, w = _randn(9, 96, device=device, gen=gen), _randn(130, 96, device=device, gen=gen)
    b = _randn(130, device=device, gen=gen)
    q, scale, offset = quantize_weight_int4(w, 32)
    q16, scale16, offset16 = quantize_weight_int4(w, 16)
    dy = _randn(9, 130, device=device, gen=gen)
    return {"int4_linear": (x, q, scale, offset, b, "gelu_tanh"),
            "int4_linear bf16 no bias G16": (x.bfloat16(), q16, scale16, offset16, None, None),
            "int4_linear x requires grad": (x.clone().requires_grad_(), q, scale, offset, b, None),
            "int4_linear_dx": (dy, q, scale, offset),
            "int4_linear_dx bf16 G16": (dy.bfloat16(), q16, scale16, offset16)}


def _lora_args(device, gen):
    """add_lora_rows writes y in place (mutates_args): opcheck checks the schema says so. T 3 and R 5 (padded to 16)."""
    y, x = _randn(3, 3, 20, device=device, gen=gen), _randn(3, 3, 24, device=device, gen=gen)
    a, b = _randn(2, 5, 24, device=device, gen=gen), _randn(2, 20, 5, device=device, gen=gen)
    index = torch.tensor([1, -1, 0], device=device)
    return {"add_lora_rows": (y, x, a, b, index), "add_lora_rows bf16 int32": (
        y.bfloat16(), x.bfloat16(), a.bfloat16(), b.bfloat16(), index.int())}


def _token_mask_args(device, gen):
    """apply_token_bitmask_ writes -inf into logits in place (mutates_args); every row, then a host list of rows. V 70:
    three words, the last partial."""
    from tritongpt.model.sampling import pack_token_bitmask

    logits = _randn(3, 70, device=device, gen=gen)
    bitmask = pack_token_bitmask(torch.rand(3, 70, generator=gen) < 0.5).to(device)
    return {"apply_token_bitmask_": (logits, bitmask, None),
            "apply_token_bitmask_ bf16 indices": (logits.bfloat16(), bitmask, [2, 0])}


def _sampling_args(device, gen):
    """sample_tokens: a new ids tensor from logits and one uniform a row; no cut, then every cut (V 70).
    sample_token_rows: each row its own settings."""
    logits = _randn(3, 70, device=device, gen=gen) * 3
    u = torch.rand(3, generator=gen).to(device)
    rows = (torch.tensor([0.8, 1.2, 1.0]).to(device), torch.tensor([0, 20, 5]).to(device),
            torch.tensor([1.0, 0.9, 0.5]).to(device), torch.tensor([0.0, 0.05, 0.1]).to(device),
            torch.tensor([False, False, True]).to(device))
    return {"sample_tokens": (logits, u, 0.8, None, None, None),
            "sample_tokens bf16 cuts": (logits.bfloat16(), u, 1.2, 20, 0.9, 0.05),
            "sample_token_rows": (logits, u, *rows)}


MAKERS = {"layer_norm": _layer_norm_args, "rms_norm": _rms_norm_args, "mlp": _mlp_args,
          "cross_entropy": _cross_entropy_args, "attention": _attention_args, "rope": _rope_args,
          "swiglu": _swiglu_args, "moe": _moe_args, "moe_mxfp4": _moe_mxfp4_args, "distill": _distill_args, "int8_linear": _int8_linear_args,
          "int4_linear": _int4_linear_args, "lora": _lora_args, "token_mask": _token_mask_args,
          "sampling": _sampling_args}
OPS = [(kernel, op) for kernel, names in (("layer_norm", ("layer_norm_fwd", "layer_norm_bwd", "add_layer_norm_fwd",
                                                         "add_layer_norm_fwd fp16+fp32",
                                                         "layer_norm_bwd ds", "add_layer_norm_bwd",
                                                         "add_layer_norm_bwd no ds")),
                                          ("rms_norm", ("rms_norm_fwd", "rms_norm_fwd bf16 x, fp32 weight",
                                                        "rms_norm_bwd", "rms_norm_bwd bf16 weight",
                                                        "add_rms_norm_fwd", "add_rms_norm_fwd fp16+fp32",
                                                        "rms_norm_bwd ds", "add_rms_norm_bwd",
                                                        "add_rms_norm_bwd no ds")),
                                          ("mlp", ("gelu_mlp_fwd", "gelu_mlp_bwd", "gelu_mlp_bwd every gradient",
                                                   "gelu_mlp_bwd frozen w1")),
                                          ("swiglu", ("swiglu_mlp_fwd", "swiglu_mlp_fwd no bias",
                                                      "swiglu_mlp_bwd", "swiglu_mlp_fwd gelu",
                                                      "swiglu_mlp_bwd gelu")),
                                          ("moe", ("moe_mlp_fwd", "moe_mlp_fwd int32 gelu", "moe_mlp_bwd",
                                                   "moe_mlp_bwd frozen w_up", "moe_mlp_fwd gpt_oss",
                                                   "moe_mlp_bwd gpt_oss")),
                                          ("moe_mxfp4", ("moe_mlp_mxfp4_fwd", "moe_mlp_mxfp4_bwd")),
                                          ("cross_entropy", ("checked_targets", "cross_entropy_fwd",
                                                             "cross_entropy_bwd", "cross_entropy_fwd smoothed+z",
                                                             "cross_entropy_bwd smoothed+z", "cross_entropy_fwd softcap",
                                                             "cross_entropy_bwd softcap",
                                                             "cross_entropy_fwd temperature+entropy",
                                                             "cross_entropy_bwd temperature+entropy")),
                                          ("attention", ("flash_attn_fwd", "flash_attn_bwd", "flash_attn_fwd gqa",
                                                         "flash_attn_bwd gqa", "flash_attn_fwd softcap",
                                                         "flash_attn_bwd softcap", "flash_attn_fwd alibi",
                                                         "flash_attn_bwd alibi", "flash_attn_fwd sinks",
                                                         "flash_attn_bwd sinks")),
                                          ("rope", ("rope_fwd", "rope_fwd shared", "rope_bwd", "rope_fwd partial",
                                                    "rope_bwd partial")),
                                          ("distill", ("distill_fwd", "distill_fwd mixture", "distill_fwd no grad")),
                                          ("int8_linear", ("int8_linear", "int8_linear bf16 no bias",
                                                           "int8_linear x requires grad", "int8_linear_dx",
                                                           "int8_linear_dx bf16")),
                                          ("int4_linear", ("int4_linear", "int4_linear bf16 no bias G16",
                                                           "int4_linear x requires grad", "int4_linear_dx",
                                                           "int4_linear_dx bf16 G16")),
                                          ("lora", ("add_lora_rows", "add_lora_rows bf16 int32")),
                                          ("token_mask", ("apply_token_bitmask_",
                                                          "apply_token_bitmask_ bf16 indices")),
                                          ("sampling", ("sample_tokens", "sample_tokens bf16 cuts",
                                                        "sample_token_rows")))
       for op in names]


def test_every_registered_op_is_listed():
    registered = {n for n in dir(ops) if not n.startswith("_") and n != "name"}
    assert registered == {op.split()[0] for _, op in OPS}


@pytest.mark.parametrize("kernel,op", OPS, ids=[op for _, op in OPS])
def test_opcheck(kernel, op, device):
    args = MAKERS[kernel](device, torch.Generator().manual_seed(len(op)))[op]
    torch.library.opcheck(getattr(ops, op.split()[0]).default, args)
