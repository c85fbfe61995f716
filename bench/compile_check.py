"""Offline compile check: every Triton launch of the GPU path, built for a GPU without one.

Why: the CPU interpreter proves the kernels' arithmetic but compiles nothing, so a change can
pass every test on a CPU machine and still fail to build for a GPU, spill registers to local
memory, or ask for more shared memory than an SM has. This check catches those on any machine:

  1. capture  The real launchers (`_fwd_launch` / `_bwd_launch` in kernels/layernorm.py, for LayerNorm
              and RMSNorm, mlp.py, swiglu.py, moe.py, attention.py, cross_entropy.py and jsd.py, `_launch`
              in rope.py, quant.py, lora.py, token_mask.py and sampling.py, quant.py's `_launch_int4` and dx
              ones, sampling.py's `_launch_rows`) run on meta tensors (shapes, dtypes and strides, no data) at GPT-2 sizes
              (the bias-free int8 and int4 Linears at a Llama width). Each `kernel[grid](...)` is recorded instead of launched, with exactly the arguments a GPU run would pass.
  2. configs  For an autotuned kernel, the configs its autotuner would time for that launch
              (after its early prune); for a plain kernel, the one launch as made.
  3. compile  Triton's own compiler and the ptxas it ships build each (launch, config) for the
              target (--arch: 90 H100/H200, the default; 80 A100; 86/89 RTX 30xx/40xx, L4);
              cuobjdump then reads registers per thread,
              local memory (spills) and shared memory from the binary.

A launch passes when at least one config it may run builds, fits the SM (shared memory within
the architecture's per-block limit, 227 KB on sm_90 and 99 KB on sm_89; registers x threads
<= 64K: else autotune skips it as OutOfResources) and spills nothing. Launches are reported by
(case, kernel, compile-time flags), a group passing when each of its launches does.
Spilling configs that still fit are listed as warnings: autotune may pick one if it is fastest.

Needs Triton's compiled mode, so `tritongpt bench compile` runs this module in a subprocess with
TRITON_INTERPRET=0; `python -m tritongpt.bench.compile_check --help` runs it directly.
"""
import argparse
import concurrent.futures as cf
import contextlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tritongpt.errors import UserError

# Sizes of the launches to compile: GPT-2 small/XL widths, 16k tokens, T = 1024 (decode: 1 query),
# GPT-2's vocabulary for the loss.
TOKENS = 16384
VOCAB = 50257
PADDED_VOCAB = 50304  # GPTConfig(vocab_multiple=64), as nanoGPT pads it
LN_WIDTHS = (768, 1600, 8192)
MLP_WIDTH = 768
# backward's needs (autograd's needs_input_grad) with only the last Linear training: no dh (dg/du) launch, so
# dW2 (dW_down) recomputes the activation on its B tiles (B_GELU / B_SWIGLU) instead of reading a stored one
FROZEN_W1 = (False, False, False, True, True)                 # the GELU MLP's (dx, dw1, db1, dw2, db2)
ONLY_DOWN = (False, False, False, False, False, True, False)  # the gated MLP's, down's bias absent
ATTN_SEQ = 1024
ATTN_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # 256: Gemma's heads
DECODE_SEQ = 16384  # a KV cache long enough to split at batch 1
INT8_ROWS = (1, 8, 4096)  # int8_linear and int4_linear: decoding one sequence, a batch of 8, a prefill
DX_ROWS = (8, 16384)  # their dx: a few rows, and a training step's tokens
# multi-LoRA serving (kernels/lora.py): rows B and tokens a row T of a decode batch and a prefill, GPT-2 small's
# (K, N) of c_attn, fc1 and fc2, rank 16 over 4 adapters, and the kernel's largest rank once
LORA_ROWS = ((8, 1), (8, 128))
LORA_SHAPES = ((MLP_WIDTH, 3 * MLP_WIDTH), (MLP_WIDTH, 4 * MLP_WIDTH), (4 * MLP_WIDTH, MLP_WIDTH))
LORA_RANK, LORA_ADAPTERS = 16, 4
# structured outputs' grammar mask (kernels/token_mask.py): a batch of rows at GPT-2's vocabulary and Qwen's
TOKEN_MASK_ROWS, TOKEN_MASK_VOCABS = 64, (50257, 151936)
# sampling's fused cuts and draw (kernels/sampling.py): each set of cuts its own build (no cut; top-k; top-p; all)
SAMPLING_CUTS = ((None, None, None), (50, None, None), (None, 0.9, None), (50, 0.9, 0.05))
SINK_WINDOW = 128  # gpt-oss's sliding-window layers, the attention-sinks cases'
INT4_GROUPS = (128, 32)  # int4_linear: G 128 (a K step of part of a group), 32 (steps of several), the latter in bf16
# a bias-free quantized Linear (HAS_BIAS=False): a GGUF-kept Llama-family layer (train/gguf_import.py: Int8Linear and
# Int4Linear of group 32, no bias) or a GPTQ/AWQ Llama folder's, at Llama 3 8B's gate/up (K -> N)
LLAMA_LINEAR = (4096, 14336)
LLAMA_ROWS = (1, 4096)  # decoding one sequence, a prefill
GGUF_GROUP = 32  # a kept GGUF layer's groups (train/gguf_import.py's GGUF_BLOCK: Q8_0's, Q4_0's and Q4_1's blocks)
# Per-block limits Triton checks before launching a kernel: opt-in dynamic shared memory by
# compute capability (CUDA programming guide, "compute capabilities" table) and registers.
MAX_SHARED_BYTES = {90: 232448, 80: 166912, 86: 101376, 89: 101376,  # H100/H200, A100, RTX 30xx, L4/RTX 40xx
                    75: 65536, 70: 98304}  # T4/RTX 20xx and V100: no bf16, so their half dtype is fp16
MAX_REGS_PER_BLOCK = 65536


def _require_compiled_mode():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: compile_check needs TRITON_INTERPRET=0 (set before triton is imported); "
              "run it as `tritongpt bench compile`", file=sys.stderr)  # (one line, the command line's other errors')
        raise SystemExit(2)
    os.environ["TRITON_INTERPRET"] = "0"  # also stops `import tritongpt` from turning it on


# ----------------------------------------------------------------------------- 1. capture
class Launch:
    """One recorded kernel launch: the kernel (JITFunction or Autotuner), its args and kwargs."""

    def __init__(self, case, kernel, args, kwargs):
        self.case, self.kernel, self.args, self.kwargs = case, kernel, args, kwargs

    @property
    def name(self):
        return getattr(self.kernel, "base_fn", getattr(self.kernel, "fn", self.kernel)).__name__

    def configs(self):
        """[(config label, kwargs to compile with)]: what the GPU run could launch."""
        from triton.runtime.autotuner import Autotuner

        if not isinstance(self.kernel, Autotuner):
            opts = {k: self.kwargs[k] for k in ("num_warps", "num_stages") if k in self.kwargs}
            return [(_config_label(self.kwargs, opts), dict(self.kwargs))]
        tuner = self.kernel
        tuner.nargs = dict(zip(tuner.arg_names, self.args))
        try:
            kept = tuner.prune_configs(self.kwargs)
        finally:
            tuner.nargs = None
        return [(_config_label(c.kwargs, c.all_kwargs()), {**self.kwargs, **c.all_kwargs()}) for c in kept]

    def jit_fn(self):
        from triton.runtime.autotuner import Autotuner

        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel

    def variant(self):
        """The launch's compile-time flags (epilogue, causal, dropout...), minus tile sizes."""
        skip = ("num_warps", "num_stages", "HEAD_DIM", "BLOCK_D", "GROUP_M", "PROGS", "NUM_STAGES", "LANE_MAX")
        return " ".join(f"{k}={v}" for k, v in self.kwargs.items() if k not in skip and not k.startswith("BLOCK_"))


def _config_label(kwargs, opts):
    # PROGS (LayerNorm's programs per SM) changes only the grid, not the code, and LANE_MAX (the loss's running max
    # per lane or per row) the code: each named, or two configs would read alike in the report
    blocks = ",".join(f"{k}={v}" for k, v in kwargs.items()
                      if k.startswith("BLOCK_") or k in ("GROUP_M", "PROGS", "LANE_MAX", "USE_TMA"))
    return f"{blocks} w{opts.get('num_warps', 4)} s{opts.get('num_stages', 3)}"


def capture(quick=False, half="bfloat16", tma=True):
    """Run every launcher on meta tensors and return the Launches they would make; half: the
    16-bit dtype's torch name (fp32 is captured too, unless quick); tma: the target has TMA (sm_90+), so the
    matmul's and attention forward's TMA configs are built beside their pointer ones."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from tritongpt.kernels import (attention, cross_entropy, jsd, layernorm, lora, mlp, moe, quant, rope, sampling,
                                   swiglu, token_mask)
    from tritongpt.model.layers import swiglu_hidden

    launches, case = [], [""]

    def record(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(case[0], self, args, kwargs))

    saved = (JITFunction.run, Autotuner.run, layernorm._sm_count, attention._sm_count, mlp.MLP_MATMUL, mlp._has_tma,
             attention._has_tma)
    JITFunction.run, Autotuner.run = record, record
    mlp._has_tma = lambda device: tma
    attention._has_tma = lambda device: tma
    # the MLPs' plain products on our matmul whatever TRITONGPT_MLP_MATMUL says: a GPU's "auto" may pick it
    mlp.MLP_MATMUL = "triton"
    # H100 SXM; only sizes the LayerNorm grid and picks attention's KV splits at decode
    layernorm._sm_count = attention._sm_count = lambda device: 132
    try:
        meta = dict(device="meta")
        half = getattr(torch, half)
        dtypes = (half,) if quick else (half, torch.float32)
        for dt in dtypes:
            name = str(dt).replace("torch.", "")
            for n in (LN_WIDTHS[:1] if quick else LN_WIDTHS):
                case[0] = f"layernorm {name} {TOKENS}x{n}"
                x = torch.empty(TOKENS, n, dtype=dt, **meta)
                w = torch.empty(n, dtype=torch.float32, **meta)
                _, mean, rstd = layernorm._fwd_launch(x, w, w, 1e-5)
                layernorm._bwd_launch(torch.empty_like(x), x, w, mean, rstd)
                # the block's residual add (add_layer_norm): an fp32 stream plus a sublayer output
                # of this dtype (autocast's case), s and its gradient in fp32
                case[0] += " residual add"
                stream = torch.empty(TOKENS, n, dtype=torch.float32, **meta)
                s, _, mean, rstd = layernorm._fwd_launch(stream, w, w, 1e-5, delta=x)
                layernorm._bwd_launch(torch.empty_like(s), s, w, mean, rstd, ds=torch.empty_like(s),
                                      dx2_dtype=None if dt == torch.float32 else dt)
                # RMSNorm (GPTConfig.norm "rmsnorm"): the same kernels with IS_RMS, alone and after the add
                case[0] = f"rmsnorm {name} {TOKENS}x{n}"
                _, _, rstd = layernorm._fwd_launch(x, w, None, 1e-5, rms=True)
                layernorm._bwd_launch(torch.empty_like(x), x, w, None, rstd)
                case[0] += " residual add"
                s, _, _, rstd = layernorm._fwd_launch(stream, w, None, 1e-5, delta=x, rms=True)
                layernorm._bwd_launch(torch.empty_like(s), s, w, None, rstd, ds=torch.empty_like(s),
                                      dx2_dtype=None if dt == torch.float32 else dt)
            # Qwen3's and Gemma 3's q/k norms: RMSNorm over each head's width, one row per token and head
            for d in (() if quick else (128, 256)):
                rows = TOKENS * (768 // 64)
                case[0] = f"rmsnorm {name} {rows}x{d} (q/k norm)"
                x = torch.empty(rows, d, dtype=dt, **meta)
                w = torch.empty(d, dtype=torch.float32, **meta)
                _, _, rstd = layernorm._fwd_launch(x, w, None, 1e-6, rms=True)
                layernorm._bwd_launch(torch.empty_like(x), x, w, None, rstd)

            c = MLP_WIDTH
            case[0] = f"mlp {name} {TOKENS}x{c}->{4 * c}"
            x = torch.empty(TOKENS, c, dtype=dt, **meta)
            w1, b1 = torch.empty(4 * c, c, dtype=dt, **meta), torch.empty(4 * c, dtype=dt, **meta)
            w2, b2 = torch.empty(c, 4 * c, dtype=dt, **meta), torch.empty(c, dtype=dt, **meta)
            # backward twice: every gradient (dh's epilogue stores a, dW2 a plain product), then W1 frozen
            # and no dx (FROZEN_W1): no dh launch, so dW2 recomputes gelu(h) on its B tiles (B_GELU)
            _, h = mlp._fwd_launch(x, w1, b1, w2, b2)
            mlp._bwd_launch(torch.empty_like(x), x, h, w1, w2)
            mlp._bwd_launch(torch.empty_like(x), x, h, w1, w2, FROZEN_W1)
            if dt == half:  # GPT-NeoX's exact GELU (GELU_ERF): the three launches that compute a GELU
                case[0] = f"mlp {name} {TOKENS}x{c}->{4 * c} exact gelu"
                n = len(launches)
                _, h = mlp._fwd_launch(x, w1, b1, w2, b2, approximate="none")
                mlp._bwd_launch(torch.empty_like(x), x, h, w1, w2, approximate="none")
                mlp._bwd_launch(torch.empty_like(x), x, h, w1, w2, FROZEN_W1, approximate="none")
                launches[n:] = [launch for launch in launches[n:] if launch.kwargs["GELU_ERF"]]
                # the squared-ReLU MLP (RELU2: Arcee's, Nemotron's): the same three launches, relu(h)^2 in them
                case[0] = f"mlp {name} {TOKENS}x{c}->{4 * c} relu2"
                n = len(launches)
                _, h = mlp._fwd_launch(x, w1, b1, w2, b2, approximate="relu2")
                mlp._bwd_launch(torch.empty_like(x), x, h, w1, w2, approximate="relu2")
                mlp._bwd_launch(torch.empty_like(x), x, h, w1, w2, FROZEN_W1, approximate="relu2")
                launches[n:] = [launch for launch in launches[n:] if launch.kwargs["RELU2"]]
                # the GELU products split (MLP_MATMUL "torch": cuBLAS's product, then one Triton GELU pass):
                # the pass's launches, forward and backward (it stores the activation), each GELU
                case[0] = f"mlp {name} {TOKENS}x{c}->{4 * c} split gelu"
                with mlp.mlp_matmul("torch"):
                    for approximate in ("tanh", "none", "relu2"):
                        _, h = mlp._fwd_launch(x, w1, b1, w2, b2, approximate=approximate)
                        mlp._bwd_launch(torch.empty_like(x), x, h, w1, w2, approximate=approximate)
            # the SwiGLU MLP (Llama's bias-free one): gate and up in one pass, its epilogues and
            # prologue, dx's two products in one launch
            hs = swiglu_hidden(c)
            case[0] = f"swiglu {name} {TOKENS}x{c}->{hs}"
            wg, wd = torch.empty(hs, c, dtype=dt, **meta), torch.empty(c, hs, dtype=dt, **meta)
            _, g, u = swiglu._fwd_launch(x, wg, None, wg, None, wd, None)
            swiglu._bwd_launch(torch.empty_like(x), x, g, u, wg, wg, wd)
            swiglu._bwd_launch(torch.empty_like(x), x, g, u, wg, wg, wd, ONLY_DOWN)  # dW_down's B_SWIGLU
            # Gemma's GeGLU: the same launches, gelu_tanh in the gate's epilogues and prologue (GATE_GELU);
            # its plain products (down, dW_gate, dW_up, dx) are swiglu's above, so not compiled twice
            case[0] = f"geglu {name} {TOKENS}x{c}->{hs}"
            n = len(launches)
            _, g, u = swiglu._fwd_launch(x, wg, None, wg, None, wd, None, activation="gelu")
            swiglu._bwd_launch(torch.empty_like(x), x, g, u, wg, wg, wd, activation="gelu")
            swiglu._bwd_launch(torch.empty_like(x), x, g, u, wg, wg, wd, ONLY_DOWN, activation="gelu")
            launches[n:] = [launch for launch in launches[n:] if launch.kwargs["GATE_GELU"]]
            if dt == half:  # the gated products split (MLP_MATMUL "torch"): the gate's Triton pass, each activation
                case[0] = f"swiglu {name} {TOKENS}x{c}->{hs} split"
                with mlp.mlp_matmul("torch"):
                    for activation in ("silu", "gelu"):
                        _, g, u = swiglu._fwd_launch(x, wg, None, wg, None, wd, None, activation=activation)
                        swiglu._bwd_launch(torch.empty_like(x), x, g, u, wg, wg, wd, activation=activation)
            # the mixture-of-experts MLP (Mixtral's 8 experts, top 2) at swiglu's widths: its grouped
            # products (x gathered, rows scattered back, the expert found from the offsets) and the
            # per-expert weight gradients
            case[0] = f"moe {name} {TOKENS}x{c}->{hs} E=8 k=2"
            experts = torch.empty(TOKENS, 2, dtype=torch.int64, **meta)
            wg, wd = torch.empty(8, hs, c, dtype=dt, **meta), torch.empty(8, c, hs, dtype=dt, **meta)
            y, g, u, order, offsets = moe._fwd_launch(x, experts, wg, wg, wd)
            moe._bwd_launch(torch.empty_like(y), x, g, u, order, offsets, wg, wg, wd)
            moe._bwd_launch(torch.empty_like(y), x, g, u, order, offsets, wg, wg, wd, (False,) * 3 + (True,))
            if dt == half:  # GPT-OSS's experts: biases in both products' epilogues, the clamped SwiGLU (CLAMP)
                case[0] = f"gpt-oss moe {name} {TOKENS}x{c}->{hs} E=8 k=2"
                bg, bd = torch.empty(8, hs, dtype=dt, **meta), torch.empty(8, c, dtype=dt, **meta)
                y, g, u, order, offsets = moe._fwd_launch(x, experts, wg, wg, wd, "gpt_oss", bg, bg, bd)
                moe._bwd_launch(torch.empty_like(y), x, g, u, order, offsets, wg, wg, wd, (True,) * 7, "gpt_oss")
                # kept MXFP4 (moe_mlp_mxfp4): the same products with each weight tile decoded from uint8 blocks and
                # e8m0 scales (MXFP4=1: blocks along K, forward's; 2: along N, backward's da and dx), dx only
                case[0] = f"gpt-oss mxfp4 moe {name} {TOKENS}x{c}->{hs} E=8 k=2"
                u8 = dict(dtype=torch.uint8, **meta)
                packed = (torch.empty(8, 2 * hs, c // 32, 16, **u8), torch.empty(8, 2 * hs, c // 32, **u8),
                          torch.empty(8, c, hs // 32, 16, **u8), torch.empty(8, c, hs // 32, **u8))
                y, g, u, order, offsets = moe._mxfp4_fwd_launch(x, experts, *packed, "gpt_oss", bg, bg, bd)
                moe._mxfp4_bwd_launch(torch.empty_like(y), x, g, u, order, offsets, *packed)

            for width in (VOCAB, PADDED_VOCAB):  # GPT-2's rows, and rows padded to a multiple of 64
                case[0] = f"cross_entropy {name} {TOKENS}x{width} ({VOCAB} classes)"
                logits = torch.empty(TOKENS, width, dtype=dt, **meta)
                targets = torch.empty(TOKENS, dtype=torch.int64, **meta)
                loss, row_max, log_sum, _ = cross_entropy._fwd_launch(logits, targets, -100, VOCAB)
                cross_entropy._bwd_launch(loss, logits, targets, row_max, log_sum, -100, VOCAB)
                if width == PADDED_VOCAB:  # label smoothing, the z-loss and a logit soft cap: their own binaries
                    case[0] += " smoothing+z-loss+softcap"
                    options = -100, VOCAB, 0.1, 1e-4, 30.0
                    loss, row_max, log_sum, _ = cross_entropy._fwd_launch(logits, targets, *options)
                    cross_entropy._bwd_launch(loss, logits, targets, row_max, log_sum, *options)
                    # RL's log-probs (GPTModel.token_logprobs): a temperature and the entropy, with and
                    # without its gradient (the kernels' HAS_TEMP and HAS_ENT binaries)
                    case[0] = case[0].replace("smoothing+z-loss+softcap", "temperature+entropy")
                    options = -100, VOCAB, 0.0, 0.0, 0.0, 0.7
                    loss, row_max, log_sum, ent = cross_entropy._fwd_launch(logits, targets, *options, True)
                    cross_entropy._bwd_launch(loss, logits, targets, row_max, log_sum, *options)
                    cross_entropy._bwd_launch(loss, logits, targets, row_max, log_sum, *options, loss, ent)
                    cross_entropy._fwd_launch(logits, targets, *options)  # the rollout's scoring: no entropy
                    # the update at temperature 1 (rlhf's default: HAS_TEMP off, HAS_ENT on)
                    options = -100, VOCAB, 0.0, 0.0, 0.0, 1.0
                    loss, row_max, log_sum, ent = cross_entropy._fwd_launch(logits, targets, *options, True)
                    cross_entropy._bwd_launch(loss, logits, targets, row_max, log_sum, *options, loss, ent)
            # the distillation loss (kernels/jsd.py) on a padded student head against a teacher's: forward KL,
            # the mixture and reverse KL (one binary each), with the gradient, and the mixture without (evaluation)
            case[0] = f"distill {name} {TOKENS}x{PADDED_VOCAB} ({VOCAB} classes)"
            logits = torch.empty(TOKENS, PADDED_VOCAB, dtype=dt, **meta)
            targets = torch.empty(TOKENS, dtype=torch.int64, **meta)
            for beta, grad in ((0.0, True), (0.5, True), (1.0, True), (0.5, False)):
                jsd._fwd_launch(logits, logits, targets, -100, VOCAB, VOCAB, 2.0, beta, 0.5, 1.0, grad)

            # fp32: GPT-2's heads, and the widest, whose tiles are the hardest to fit (99 KB on sm_89)
            head_dims = (64, 128) if quick else (ATTN_HEAD_DIMS if dt == half else (64, 256))
            for d in head_dims:
                for p in ((0.0,) if quick else (0.0, 0.1)):
                    for tq in ((ATTN_SEQ,) if quick else (ATTN_SEQ, 1)):
                        case[0] = f"attention {name} hd{d} Tq={tq} Tk={ATTN_SEQ}" + (f" dropout={p}" if p else "")
                        heads, batch = max(768 // d, 1), TOKENS // ATTN_SEQ
                        # [B, T, H, D] buffers seen as [B, H, T, D], as the model passes them
                        q = torch.empty(batch, tq, heads, d, dtype=dt, **meta).transpose(1, 2)
                        k = torch.empty(batch, ATTN_SEQ, heads, d, dtype=dt, **meta).transpose(1, 2)
                        seed = torch.full((), 1234, dtype=torch.int64, **meta)  # read on the device: a pointer
                        o, lse = attention._fwd_launch(q, k, k, True, d ** -0.5, p, seed)
                        if tq > 1:  # decode runs forward only
                            attention._bwd_launch(torch.empty_like(o), q, k, k, o, lse, True, d ** -0.5, p, seed)
                        if tq > 1 and p == 0.0:  # grouped-query (one KV head): dK/dV's group loop, its own binary
                            case[0] = f"attention {name} hd{d} Tq={tq} Tk={ATTN_SEQ} kv_heads=1"
                            o, lse = attention._fwd_launch(q, k[:, :1], k[:, :1], True, d ** -0.5, p, seed)
                            attention._bwd_launch(torch.empty_like(o), q, k[:, :1], k[:, :1], o, lse, True, d ** -0.5,
                                                  p, seed)
                            case[0] = f"attention {name} hd{d} Tq={tq} Tk={ATTN_SEQ}"
                        if tq > 1 and d == 64:  # packed documents (GPT-2's head dim): their own binaries
                            case[0] += " documents"
                            starts = torch.empty(batch, ATTN_SEQ, dtype=torch.int32, **meta)
                            o, lse = attention._fwd_launch(q, k, k, True, d ** -0.5, p, seed, starts, starts)
                            attention._bwd_launch(torch.empty_like(o), q, k, k, o, lse, True, d ** -0.5, p, seed,
                                                  starts, starts)
                        if tq > 1 and p == 0.0 and dt == half and (d == 64 or not quick and d in (128, 256)):
                            # Gemma 2's soft cap (HAS_SOFTCAP: a tanh per score, forward and both backward
                            # passes): GPT-2's head dim, 27B's 128 and 2B/9B's 256, in the 16-bit dtype
                            case[0] = f"attention {name} hd{d} Tq={tq} Tk={ATTN_SEQ} softcap=50"
                            o, lse = attention._fwd_launch(q, k, k, True, d ** -0.5, p, seed, softcap=50.0)
                            attention._bwd_launch(torch.empty_like(o), q, k, k, o, lse, True, d ** -0.5, p, seed,
                                                  softcap=50.0)
                        if tq > 1 and p == 0.0 and dt == half and d == 64:
                            # ALiBi (HAS_ALIBI: a bias per score in forward and both backward passes), at
                            # GPT-2's head dim in the 16-bit dtype (BLOOM's and MPT's heads are 64 or 128)
                            case[0] = f"attention {name} hd{d} Tq={tq} Tk={ATTN_SEQ} alibi"
                            slopes = torch.empty(heads, dtype=torch.float32, **meta)
                            o, lse = attention._fwd_launch(q, k, k, True, d ** -0.5, p, seed, alibi=slopes)
                            attention._bwd_launch(torch.empty_like(o), q, k, k, o, lse, True, d ** -0.5, p, seed,
                                                  alibi=slopes)
                        if tq > 1 and p == 0.0 and dt == half and d == 64:
                            # gpt-oss's attention sinks (HAS_SINKS: the forward's epilogue folds each head's sink
                            # into the row sum) on its sliding-window layers (window 128: HAS_DOCS) and its heads
                            # (64 wide, 8 query heads a KV head); the backward kernels are the plain ones (the sink's
                            # gradient is a torch reduction over Delta and L), so only the forward is its own binary
                            case[0] = f"attention {name} hd{d} Tq={tq} Tk={ATTN_SEQ} sinks window={SINK_WINDOW}"
                            sinks = torch.empty(heads, dtype=torch.float32, **meta)
                            starts, ends = attention.window_bounds(SINK_WINDOW, ATTN_SEQ, batch, "meta")
                            kv = torch.empty(batch, ATTN_SEQ, heads // 4, d, dtype=dt, **meta).transpose(1, 2)
                            o, lse = attention._fwd_launch(q, kv, kv, True, d ** -0.5, p, seed, starts, ends,
                                                           sinks=sinks)
                            attention._bwd_launch(torch.empty_like(o), q, kv, kv, o, lse, True, d ** -0.5, p, seed,
                                                  starts, ends, sinks=sinks)

            # KV-cache decode at batch 1 (the split-KV forward: _attn_fwd_split, then _attn_fwd_combine): one
            # query, and a speculative step verifying 4 (Tq > 1: the causal mask inside a split); Llama's 32 query
            # heads over 8 at 128; a sliding window (Mistral's: HAS_DOCS), Gemma 2's soft cap, ALiBi
            for d in ((64, 128) if quick else (ATTN_HEAD_DIMS if dt == half else (64, 256))):
                heads = max(768 // d, 1) if d != 128 else 32
                kv_heads = 8 if d == 128 else heads
                k = torch.empty(1, DECODE_SEQ, kv_heads, d, dtype=dt, **meta).transpose(1, 2)
                for tq in (1, 4):
                    q = torch.empty(1, tq, heads, d, dtype=dt, **meta).transpose(1, 2)
                    case[0] = f"attention {name} hd{d} decode Tq={tq} Tk={DECODE_SEQ} heads={heads}/{kv_heads}"
                    attention._fwd_launch(q, k, k, True, d ** -0.5, 0.0, None)
                    if tq == 1 and dt == half and d in (64, 128):
                        starts, ends = attention.window_bounds(4096, DECODE_SEQ, 1, "meta")
                        case[0] += " window"
                        attention._fwd_launch(q, k, k, True, d ** -0.5, 0.0, None, starts, ends)
                        case[0] = case[0].replace(" window", " softcap=50")
                        attention._fwd_launch(q, k, k, True, d ** -0.5, 0.0, None, softcap=50.0)
                        case[0] = case[0].replace(" softcap=50", " alibi")
                        attention._fwd_launch(q, k, k, True, d ** -0.5, 0.0, None,
                                              alibi=torch.empty(heads, dtype=torch.float32, **meta))
                        if d == 64:  # the sinks in the split-KV combine (HAS_SINKS: one more term of its sum)
                            case[0] = case[0].replace(" alibi", " sinks")
                            attention._fwd_launch(q, k, k, True, d ** -0.5, 0.0, None,
                                                  sinks=torch.empty(heads, dtype=torch.float32, **meta))
                if dt == half and d in (64, 128):
                    # A whole preallocated cache with its filled length read on the device (kv_len: HAS_KV_LEN),
                    # as a CUDA-graph decode step calls it: the split path at batch 1 (Tq 1 and 4; Mistral's
                    # window on Llama's heads), the single pass at batch 32 (its query tiles fill the GPU)
                    kv_len = torch.empty((), dtype=torch.int64, **meta)
                    for batch, tq in ((1, 1), (1, 4), (32, 1)):
                        kb = torch.empty(batch, DECODE_SEQ, kv_heads, d, dtype=dt, **meta).transpose(1, 2)
                        q = torch.empty(batch, tq, heads, d, dtype=dt, **meta).transpose(1, 2)
                        case[0] = (f"attention {name} hd{d} kv_len Tq={tq} Tk_cap={DECODE_SEQ} "
                                   f"heads={heads}/{kv_heads} B={batch}")
                        attention._fwd_launch(q, kb, kb, True, d ** -0.5, 0.0, None, kv_len=kv_len)
                        # the same over an int8 cache (INT8_KV: int8 K/V tiles, fp32 scales a position)
                        k8 = torch.empty(batch, DECODE_SEQ, kv_heads, d, dtype=torch.int8, **meta).transpose(1, 2)
                        scales = torch.empty(batch, kv_heads, DECODE_SEQ, dtype=torch.float32, **meta)
                        case[0] += " int8"
                        attention._fwd_launch(q, k8, k8, True, d ** -0.5, 0.0, None, kv_len=kv_len, k_scale=scales,
                                              v_scale=scales)
                        case[0] = case[0].removesuffix(" int8")
                        if batch == 1 and tq == 1 and d == 128:
                            starts, ends = attention.window_bounds(4096, DECODE_SEQ, 1, "meta")
                            case[0] += " window"
                            attention._fwd_launch(q, kb, kb, True, d ** -0.5, 0.0, None, starts, ends, kv_len=kv_len)
                        if tq == 1 and d == 64:  # gpt-oss's sinks in a graph's decode step: the split path's
                            # combine at batch 1, the single pass's epilogue with HAS_KV_LEN at batch 32
                            case[0] += " sinks"
                            attention._fwd_launch(q, kb, kb, True, d ** -0.5, 0.0, None, kv_len=kv_len,
                                                  sinks=torch.empty(heads, dtype=torch.float32, **meta))
                    # continuous batching (train/engine.py): a length a row (kv_len [B]: a row stride of 1, its own
                    # binary) over a KVCache at batch 32, and over a paged cache of vLLM's 16-position pages (PAGE:
                    # the single pass at batch 32, float and int8; the split path at batch 1)
                    for batch, how in ((32, "rows"), (32, "paged16"), (1, "paged16")):
                        lens = torch.empty(batch, dtype=torch.int64, **meta)
                        q = torch.empty(batch, 1, heads, d, dtype=dt, **meta).transpose(1, 2)
                        case[0] = (f"attention {name} hd{d} kv_len {how} Tq=1 Tk_cap={DECODE_SEQ} "
                                   f"heads={heads}/{kv_heads} B={batch}")
                        if how == "rows":
                            kb = torch.empty(batch, DECODE_SEQ, kv_heads, d, dtype=dt, **meta).transpose(1, 2)
                            attention._fwd_launch(q, kb, kb, True, d ** -0.5, 0.0, None, kv_len=lens)
                            continue
                        table = torch.empty(batch, DECODE_SEQ // 16, dtype=torch.int32, **meta)
                        pool = torch.empty(batch * DECODE_SEQ // 16, kv_heads, 16, d, dtype=dt, **meta)
                        attention._fwd_launch(q, pool, pool, True, d ** -0.5, 0.0, None, kv_len=lens,
                                              block_table=table)
                        if batch == 32:
                            pool8 = torch.empty(pool.shape, dtype=torch.int8, **meta)
                            scales = torch.empty(pool.shape[:3], dtype=torch.float32, **meta)
                            case[0] += " int8"
                            attention._fwd_launch(q, pool8, pool8, True, d ** -0.5, 0.0, None, kv_len=lens,
                                                  k_scale=scales, v_scale=scales, block_table=table)

            for d in ((64,) if quick else (64, 128, 256)):  # RoPE of q and k: GPT-2's heads, the widest it takes
                case[0] = f"rope {name} {TOKENS} tokens hd{d}"
                heads, batch = max(768 // d, 1), TOKENS // ATTN_SEQ
                q = torch.empty(batch, ATTN_SEQ, heads, d, dtype=dt, **meta).transpose(1, 2)
                positions = torch.empty(batch, ATTN_SEQ, dtype=torch.int64, **meta)
                inv_freq = torch.empty(d // 2, dtype=torch.float32, **meta)  # rope_inv_freq's, scaled or not
                for inverse in (False, True):  # forward, and backward's rotation by -angle
                    rope._launch(q, q, positions, inv_freq, inverse)
            # partial rotary in the 16-bit dtype (the rotated half R/2 wide, the rest copied: PASS): GPT-NeoX's
            # quarter of 64, and Phi-4-mini's 96 of 128 with LongRoPE's attention factor on cos and sin (SCALED)
            for d, r, mscale in (((64, 16, 1.0), (128, 96, 1.19)) if dt == half else ()):
                case[0] = f"rope {name} {TOKENS} tokens hd{d} rotary{r}" + (f" mscale={mscale}" if mscale != 1 else "")
                heads, batch = max(768 // d, 1), TOKENS // ATTN_SEQ
                q = torch.empty(batch, ATTN_SEQ, heads, d, dtype=dt, **meta).transpose(1, 2)
                positions = torch.empty(batch, ATTN_SEQ, dtype=torch.int64, **meta)
                inv_freq = torch.empty(r // 2, dtype=torch.float32, **meta)
                for inverse in (False, True):
                    rope._launch(q, q, positions, inv_freq, inverse, r, mscale)

        # the int8 weight-only linear (inference): decode rows (1, 8: its BLOCK_M 16 tiles) and a prefill's, on GPT-2
        # small's fc1 (the GELU in its epilogue) and fc2, in each 16-bit dtype the target has; then with group scales
        # (a GPTQ 8-bit folder's, scale [N, K / G]: G > 0, each q tile dequantized in the K loop) at int4's groups
        for dt in (half,) + ((torch.float16,) if half != torch.float16 else ()):
            name = str(dt).replace("torch.", "")
            for g in (0,) + (INT4_GROUPS if dt == half else INT4_GROUPS[:1]):
                for m in INT8_ROWS:
                    for k, n, activation in ((MLP_WIDTH, 4 * MLP_WIDTH, "gelu_tanh"), (4 * MLP_WIDTH, MLP_WIDTH, None)):
                        case[0] = f"int8_linear {name}{f' G{g}' if g else ''} M={m} {k}->{n}" + \
                            (f" {activation}" if activation else "")
                        x = torch.empty(m, k, dtype=dt, **meta)
                        qweight = torch.empty(n, k, dtype=torch.int8, **meta)
                        scale = torch.empty((n, k // g) if g else (n,), dtype=torch.float32, **meta)
                        quant._launch(x, qweight, scale, torch.empty(n, dtype=dt, **meta), activation)

        # the int4 weight-only linear: int8's rows and shapes, at G 128 (and 32: K steps of several groups, the
        # scale and offset a [BLOCK_N, BLOCK_K / G] tile) in the target's 16-bit dtype, G 128 in fp16
        for dt in (half,) + ((torch.float16,) if half != torch.float16 else ()):
            name = str(dt).replace("torch.", "")
            for g in (INT4_GROUPS if dt == half else INT4_GROUPS[:1]):
                for m in INT8_ROWS:
                    for k, n, activation in ((MLP_WIDTH, 4 * MLP_WIDTH, "gelu_tanh"), (4 * MLP_WIDTH, MLP_WIDTH, None)):
                        case[0] = f"int4_linear {name} G{g} M={m} {k}->{n}" + (f" {activation}" if activation else "")
                        x = torch.empty(m, k, dtype=dt, **meta)
                        qweight = torch.empty(n, k // 2, dtype=torch.uint8, **meta)
                        scale = torch.empty(n, k // g, dtype=torch.float32, **meta)
                        quant._launch_int4(x, qweight, scale, torch.empty_like(scale),
                                           torch.empty(n, dtype=dt, **meta), activation)

        half_name = str(half).replace("torch.", "")
        # the squared-ReLU MLP's fc1 (mlp "relu2": RELU2 in the epilogue), int8 a scale a row and int4 G 128, in the
        # target's 16-bit dtype, at int8's rows
        for m in INT8_ROWS:
            k, n = MLP_WIDTH, 4 * MLP_WIDTH
            x, bias = torch.empty(m, k, dtype=half, **meta), torch.empty(n, dtype=half, **meta)
            case[0] = f"int8_linear {half_name} M={m} {k}->{n} relu2"
            quant._launch(x, torch.empty(n, k, dtype=torch.int8, **meta), torch.empty(n, dtype=torch.float32, **meta),
                          bias, "relu2")
            case[0] = f"int4_linear {half_name} G{INT4_GROUPS[0]} M={m} {k}->{n} relu2"
            scale = torch.empty(n, k // INT4_GROUPS[0], dtype=torch.float32, **meta)
            quant._launch_int4(x, torch.empty(n, k // 2, dtype=torch.uint8, **meta), scale, torch.empty_like(scale),
                               bias, "relu2")

        # both without a bias (HAS_BIAS=False, else never built: the GPT-2 layers above all have one), as a Llama-family
        # GGUF file's layers are kept (int8 group 32, int4 group 32 with float offsets) and a GPTQ 8-bit folder's
        # per-row int8 ones, at a Llama width, decode and prefill rows, in the target's 16-bit dtype; no activation
        # (a SwiGLU's gate and up are plain Linears)
        k, n = LLAMA_LINEAR
        for m in LLAMA_ROWS:
            x = torch.empty(m, k, dtype=half, **meta)
            for g in (0, GGUF_GROUP):
                case[0] = f"int8_linear {half_name}{f' G{g}' if g else ''} M={m} {k}->{n} no bias"
                scale = torch.empty((n, k // g) if g else (n,), dtype=torch.float32, **meta)
                quant._launch(x, torch.empty(n, k, dtype=torch.int8, **meta), scale)
            case[0] = f"int4_linear {half_name} G{GGUF_GROUP} M={m} {k}->{n} no bias"
            scale = torch.empty(n, k // GGUF_GROUP, dtype=torch.float32, **meta)
            quant._launch_int4(x, torch.empty(n, k // 2, dtype=torch.uint8, **meta), scale, torch.empty_like(scale))

        # their input gradients (QLoRA: the frozen quantized weight's dx = dy @ W), fc1's and fc2's: a few rows and a
        # training step's tokens, at int8 (a scale a row, and group scales) and int4, G 128 in each 16-bit dtype, G 32
        # in the target's
        for dt in (half,) + ((torch.float16,) if half != torch.float16 else ()):
            name = str(dt).replace("torch.", "")
            for m in DX_ROWS:
                for k, n in ((MLP_WIDTH, 4 * MLP_WIDTH), (4 * MLP_WIDTH, MLP_WIDTH)):
                    dy = torch.empty(m, n, dtype=dt, **meta)
                    for g in (0,) + (INT4_GROUPS if dt == half else INT4_GROUPS[:1]):  # int8's group scales too
                        case[0] = f"int8_linear dx {name}{f' G{g}' if g else ''} M={m} {n}->{k}"
                        quant._launch_dx(dy, torch.empty(n, k, dtype=torch.int8, **meta),
                                         torch.empty((n, k // g) if g else (n,), dtype=torch.float32, **meta))
                    for g in (INT4_GROUPS if dt == half else INT4_GROUPS[:1]):
                        case[0] = f"int4_linear dx {name} G{g} M={m} {n}->{k}"
                        scale = torch.empty(n, k // g, dtype=torch.float32, **meta)
                        quant._launch_int4_dx(dy, torch.empty(n, k // 2, dtype=torch.uint8, **meta), scale,
                                              torch.empty_like(scale))
        # and at the Llama width (a bias changes no dx launch: the shapes are what is new), a few rows and training's
        k, n = LLAMA_LINEAR
        for m in DX_ROWS:
            dy = torch.empty(m, n, dtype=half, **meta)
            for g in (0, GGUF_GROUP):
                case[0] = f"int8_linear dx {half_name}{f' G{g}' if g else ''} M={m} {n}->{k} llama"
                quant._launch_dx(dy, torch.empty(n, k, dtype=torch.int8, **meta),
                                 torch.empty((n, k // g) if g else (n,), dtype=torch.float32, **meta))
            case[0] = f"int4_linear dx {half_name} G{GGUF_GROUP} M={m} {n}->{k} llama"
            scale = torch.empty(n, k // GGUF_GROUP, dtype=torch.float32, **meta)
            quant._launch_int4_dx(dy, torch.empty(n, k // 2, dtype=torch.uint8, **meta), scale, torch.empty_like(scale))

        # multi-LoRA's shrink and expand (inference): a decode batch and a prefill at GPT-2 small's widths, rank 16,
        # in the target's 16-bit dtype and fp32 (quick: fc1's only, 16-bit), then the largest rank (its tiles shrink)
        for dt in (half,) if quick else (half, torch.float32):
            name = str(dt).replace("torch.", "")
            ranks = ((LORA_SHAPES[1], LORA_RANK),) if quick else \
                [(kn, LORA_RANK) for kn in LORA_SHAPES] + [(LORA_SHAPES[1], lora.MAX_RANK)]
            # each by both kernel pairs: per row, and grouped (the tokens sorted into one segment an adapter)
            for (k, n), r in ranks:
                for (b, t), grouped in [(bt, g) for bt in LORA_ROWS for g in (False, True)]:
                    case[0] = f"lora {name} {'grouped' if grouped else 'rows'} B={b} T={t} {k}->{n} R={r}"
                    lora._launch(torch.empty(b, t, n, dtype=dt, **meta), torch.empty(b, t, k, dtype=dt, **meta),
                                 torch.empty(LORA_ADAPTERS, r, k, dtype=dt, **meta),
                                 torch.empty(LORA_ADAPTERS, n, r, dtype=dt, **meta),
                                 torch.empty(b, dtype=torch.int32, **meta), grouped=grouped)

        # the grammar's token mask (inference): every row, and a list of rows (indices), in the target's 16-bit dtype
        # and fp32 (quick: Qwen's vocabulary, 16-bit)
        for dt in (half,) if quick else (half, torch.float32):
            name = str(dt).replace("torch.", "")
            for v in TOKEN_MASK_VOCABS[1:] if quick else TOKEN_MASK_VOCABS:
                for rows in (None, TOKEN_MASK_ROWS // 2):
                    case[0] = f"token_mask {name} B={TOKEN_MASK_ROWS} V={v}" + (f" indices={rows}" if rows else "")
                    token_mask._launch(torch.empty(TOKEN_MASK_ROWS, v, dtype=dt, **meta),
                                       torch.empty(TOKEN_MASK_ROWS, -(v // -32), dtype=torch.int32, **meta),
                                       None if rows is None else torch.empty(rows, dtype=torch.int32, **meta))

        # sampling's draw with its cuts fused: each set of cuts at both vocabularies in the 16-bit dtype, all of them
        # in fp32 too (quick: Qwen's vocabulary, 16-bit, no cut and all of them)
        for dt in (half,) if quick else (half, torch.float32):
            name = str(dt).replace("torch.", "")
            for v in TOKEN_MASK_VOCABS[1:] if quick else TOKEN_MASK_VOCABS:
                cuts = SAMPLING_CUTS[::3] if quick else SAMPLING_CUTS if dt == half else SAMPLING_CUTS[-1:]
                for k, p, mp in cuts:
                    case[0] = f"sampling {name} B={TOKEN_MASK_ROWS} V={v} top_k={k} top_p={p} min_p={mp}"
                    sampling._launch(torch.empty(TOKEN_MASK_ROWS, v, dtype=dt, **meta),
                                     torch.empty(TOKEN_MASK_ROWS, dtype=torch.float32, **meta),
                                     torch.empty(TOKEN_MASK_ROWS, dtype=torch.int64, **meta), 0.8, k, p, mp)
                # each row its own settings (sample_token_rows, the engine's step): every cut compiled in, one build
                case[0] = f"sampling {name} B={TOKEN_MASK_ROWS} V={v} per-row settings"
                f32 = lambda: torch.empty(TOKEN_MASK_ROWS, dtype=torch.float32, **meta)  # noqa: E731
                sampling._launch_rows(torch.empty(TOKEN_MASK_ROWS, v, dtype=dt, **meta), f32(),
                                      torch.empty(TOKEN_MASK_ROWS, dtype=torch.int64, **meta), f32(),
                                      torch.empty(TOKEN_MASK_ROWS, dtype=torch.int64, **meta), f32(), f32(),
                                      torch.empty(TOKEN_MASK_ROWS, dtype=torch.bool, **meta))
    finally:
        (JITFunction.run, Autotuner.run, layernorm._sm_count, attention._sm_count, mlp.MLP_MATMUL, mlp._has_tma,
         attention._has_tma) = saved
    return launches


# ----------------------------------------------------------------------------- 3. compile
_JOBS = []  # (launch index, config label, kwargs); read by forked workers
_MMA = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)")
_LOAD, _VECTOR = re.compile(r"\bld\.global\S*"), re.compile(r"\.v[248]\.")
_TMP_LABEL = re.compile(r"\$L__tmp\d+:")


def _compile(job_index, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    launch, label, kwargs = _JOBS[job_index]
    fn = launch.jit_fn()
    out = {"kernel": launch.name, "case": launch.case, "variant": launch.variant(), "config": label}
    t0 = time.perf_counter()
    try:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        # The same binder a GPU launch uses: it specializes ints (== 1, divisible by 16) and
        # pointer alignment exactly as at run time, so the binary is the one the GPU would run.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
        # ptxas's own report (`-v`, which Triton passes) printed by the build itself: read there, not from a
        # second ptxas run (as long as the build's), unless Triton's cache had the binary
        ptxas_log = io.StringIO()
        nvidia = getattr(getattr(triton, "knobs", None), "nvidia", None)  # (a Triton before its knobs: None)
        with contextlib.redirect_stdout(ptxas_log), _knob(nvidia, "dump_ptxas_log", True):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        res = _resources(kernel.asm["cubin"])
        # a stack frame holds spills or local arrays (sin/cos's slow-path argument reduction: RoPE's 32 bytes at 91
        # registers): ptxas's report tells them apart, read only then (~1 in 10 configs)
        # (reported, not yet in _status: RoPE's hd128 rotary96 launch and some attention tiles spill 4 bytes, and
        # RoPE's one config would leave its launch with none clean)
        spills, log = 0, ptxas_log.getvalue()
        if res["stack_bytes"]:
            spills = _parse_spills(log) if "spill stores" in log else _spill_bytes(kernel.asm["ptx"], arch)
        out.update(res, spill_bytes=spills)
        out["shared"] = int(kernel.metadata.shared)
        out["num_warps"] = int(kernel.metadata.num_warps)
        # searched line by line, and only the lines that name the instruction: a regex over the
        # whole PTX costs ~5 ms a kernel, most of a cache hit's time (749 of them in --quick)
        lines = kernel.asm["ptx"].splitlines()
        out["tensor_core_ops"] = sum(len(_MMA.findall(ln)) for ln in lines if "mma" in ln)
        # Hopper's TMA copies (the matmul's USE_TMA configs): a descriptor that fell back to plain loads shows 0
        out["tma_copies"] = sum(1 for ln in lines if "cp.async.bulk.tensor" in ln)
        # global loads as 2/4-wide vectors vs one element at a time (alignment decides: e.g. the
        # cross-entropy's rows of 50257 bf16 load one by one, padded to 50304 as 16-byte vectors)
        loads = [ld for ln in lines if "ld.global" in ln for ld in _LOAD.findall(ln)]
        out["vector_loads"] = sum(1 for ld in loads if _VECTOR.search(ld))
        out["scalar_loads"] = len(loads) - out["vector_loads"]
        out["ptx_sha1"] = ptx_fingerprint(kernel.asm["ptx"])
        out["status"] = _status(out, arch)
    except Exception as exc:  # a compile error is a result to report, not a crash of the check
        out["status"] = "error"
        # the last line: Triton's CompilationError puts the source excerpt first, the cause last
        lines = str(exc).strip().splitlines() or [""]
        out["error"] = f"{type(exc).__name__}: {lines[-1][:300]}"
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    return out


def ptx_fingerprint(ptx: str) -> str:
    """sha1 of the PTX's code without line info and debug sections: a refactor that claims not
    to change the GPU path (e.g. of an interpreter-only branch) can be checked to keep it."""
    import hashlib

    code = ptx.split(".section\t.debug")[0]
    # .loc/.file: source positions; $L__tmpN: labels that only mark inlined calls for debug info
    # (the regex only on lines that start like one: on every line it cost more than the hash)
    keep = [ln for ln in code.splitlines()
            if not (s := ln.strip()).startswith((".loc", ".file", "//"))
            and not (s.startswith("$L__tmp") and _TMP_LABEL.fullmatch(s))]
    return hashlib.sha1("\n".join(keep).encode()).hexdigest()[:16]


def _resources(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return _parse_resources(text)


def _parse_resources(text: str) -> dict:
    """cuobjdump --dump-resource-usage's registers, stack frame and LOCAL bytes a thread. ptxas spills to the stack
    frame, not to LOCAL: the fp32 matmul's TMA configs read REG:32 STACK:10368 LOCAL:0 (17 KB of spill stores)."""
    m = re.search(r"REG:(\d+)\s+STACK:(\d+).*?LOCAL:(\d+)", text, re.S)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump's resource usage: {text[:200]!r}")
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2)), "local_bytes": int(m.group(3))}


@contextlib.contextmanager
def _knob(knobs, name, value):
    """Triton's knob set for the block, then put back (the forked build processes share nothing else); nothing
    where this Triton has no such knob (no ptxas report printed: the spills are read by a second ptxas run)."""
    if not hasattr(knobs, name):
        yield
        return
    before = getattr(knobs, name)
    setattr(knobs, name, value)
    try:
        yield
    finally:
        setattr(knobs, name, before)


def _spill_bytes(ptx: str, arch) -> int:
    """The spill stores a thread that `ptxas -v` reports for ptx, built with the options Triton builds it with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(d) / "kernel.o")],
                             capture_output=True, text=True, check=True).stderr
    return _parse_spills(log)


def _parse_spills(log: str) -> int:
    m = re.search(r"(\d+) bytes spill stores", log)
    if not m:
        raise RuntimeError(f"cannot read ptxas's spill stores: {log[:200]!r}")
    return int(m.group(1))


def _status(r, arch=90) -> str:
    if r["shared"] > MAX_SHARED_BYTES[arch]:
        return "too much shared memory"
    if r["registers"] * r["num_warps"] * 32 > MAX_REGS_PER_BLOCK:
        return "too many registers"
    return "spills" if r["local_bytes"] else "ok"


def run_check(arch=90, quick=False, workers=None, log=print, cases=None, one_config=False):
    """Compile every captured (launch, config); returns (rows, per-launch verdicts).
    cases: a regular expression; only the launches whose case it matches (re.search).
    one_config: a launch's configs built one at a time until one is clean (rounds: every launch's next config at
    once), each launch starting at another of its kernel's configs (its ordinal among the kernel's launches), so
    the kernel's configs are spread over its launches: the same verdicts (a launch without a clean config has had
    every config built) from under a third of the builds; then each kernel config no launch reached, once, so
    that every config of every kernel is built at least once (a config that does not compile is found)."""
    # the half dtype training runs in there (--dtype auto): fp16 before Ampere, else bf16
    # --quick leaves out the TMA configs (~150 more builds: tests/test_compile_check.py builds a few on their own)
    launches = capture(quick, "float16" if arch < 80 else "bfloat16", tma=arch >= 90 and not quick)
    if cases is not None:
        launches = [launch for launch in launches if re.search(cases, launch.case)]
        if not launches:
            raise UserError(f"--cases {cases!r} matches no launch")
    _JOBS.clear()
    job_of, jobs_of_launch = {}, []
    for launch in launches:
        jobs = []
        for label, kwargs in launch.configs():
            # The same kernel with the same arguments (e.g. a bf16 hd64 forward captured
            # twice) compiles once; different cases differ in shapes or constexprs.
            key = (launch.case, launch.name, label, repr(launch.args), repr(sorted(kwargs.items())))
            if key not in job_of:
                job_of[key] = len(_JOBS)
                _JOBS.append((launch, label, kwargs))
            jobs.append(job_of[key])
        jobs_of_launch.append(jobs)
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    what = (f"of {len(_JOBS)} (launch, config) pairs, those that give each of {len(launches)} captured kernel "
            "launches a clean config and build every kernel config once," if one_config else
            f"{len(_JOBS)} (launch, config) pairs from {len(launches)} captured kernel launches")
    log(f"compiling {what} for sm_{arch} with {workers} processes")
    t0 = time.perf_counter()
    rows = [None] * len(_JOBS)
    # fork: workers inherit _JOBS (meta tensors and kernels do not need pickling)
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        labels = [label for _, label, _ in _JOBS]
        for batch in (_rounds(launches, jobs_of_launch, rows, labels) if one_config else [range(len(_JOBS))]):
            for j, row in zip(batch, pool.map(_compile, batch, [arch] * len(batch))):
                rows[j] = row
    log(f"compiled {sum(r is not None for r in rows)} in {time.perf_counter() - t0:.0f} s")
    judged = verdicts(launches, jobs_of_launch, rows)
    return [r for r in rows if r is not None], judged


def _clean(rows, j) -> bool:
    """Job j was built (one_config leaves some rows None) and is clean."""
    return rows[j] is not None and rows[j]["status"] == "ok"


def _rounds(launches, jobs_of_launch, rows, labels):
    """run_check's one_config order: yields each round's new job indices (rows filled by the caller in between):
    every launch's next config, starting at its ordinal among its kernel's launches, until it has a clean one;
    then each kernel config (labels: a job's config label) no launch reached, once, at the first launch that has
    it, so that a config that does not compile is still found (~1 in 6 of --quick's were left unbuilt)."""
    ordinal, start = {}, []
    for launch in launches:
        start.append(ordinal.get(launch.name, 0))
        ordinal[launch.name] = start[-1] + 1
    for r in range(max(map(len, jobs_of_launch), default=0)):
        batch = []
        for jobs, s in zip(jobs_of_launch, start):
            if r < len(jobs) and not any(_clean(rows, j) for j in jobs):
                j = jobs[(s + r) % len(jobs)]
                if rows[j] is None and j not in batch:
                    batch.append(j)
        if batch:
            yield batch
    built = {(launch.name, labels[j]) for launch, jobs in zip(launches, jobs_of_launch) for j in jobs
             if rows[j] is not None}
    batch = []
    for launch, jobs in zip(launches, jobs_of_launch):
        for j in jobs:
            if (launch.name, labels[j]) not in built:
                built.add((launch.name, labels[j]))
                batch.append(j)
    if batch:
        yield batch


def verdicts(launches, jobs_of_launch, rows) -> dict:
    """{(case, kernel, flags): clean}. By flags too: the MLP's one matmul kernel runs four
    epilogues and each must build. A group is clean when EVERY launch in it (the same flags at
    other shapes, e.g. the dW1 and dx products) has at least one clean config (before: any config
    of any launch of the kernel in the case made it pass)."""
    out = {}
    for launch, jobs in zip(launches, jobs_of_launch):
        key = (launch.case, launch.name, launch.variant())
        out[key] = out.get(key, True) and any(_clean(rows, j) for j in jobs)
    return out


# ----------------------------------------------------------------------------- report
def environment(arch) -> dict:
    import triton

    from tritongpt.bench.common import cpu_name, git_commit

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    version = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout.strip()
    return {"target": f"sm_{arch}", "triton": triton.__version__, "ptxas": version.splitlines()[-1] if version else "",
            "git_commit": git_commit(), "compiled_on": cpu_name(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def markdown(env, rows, judged) -> str:
    from tritongpt.bench.report import markdown_table

    lines = [f"# Offline compile check for {env['target']}", "",
             f"Triton {env['triton']}, {env['ptxas']}; commit {env['git_commit']}; built on {env['compiled_on']} "
             f"(no GPU), {env['timestamp']}. Generated by `tritongpt bench compile`; these are compiler figures, "
             "not timings.", ""]
    if env.get("cases"):
        lines += [f"**Partial**: only the cases matching `{env['cases']}` (--cases).", ""]
    if env.get("one_config"):
        lines += ["**One config a launch** (--one-config): each launch's configs built until one was clean, then "
                  "each kernel config no launch reached, once; the table lists only those built.", ""]
    lines += [f"Launches: {sum(judged.values())} of {len(judged)} have a config that builds, fits and does not "
              "spill.", ""]
    bad = [f"{case} / {kernel} [{flags}]" for (case, kernel, flags), ok in judged.items() if not ok]
    if bad:
        lines += ["**Launches with no clean config:**", ""] + [f"- {b}" for b in bad] + [""]
    table = [[r["case"], r["kernel"], r["variant"], r["config"], r.get("registers", "-"),
              r.get("local_bytes", 0) + r.get("spill_bytes", 0) if "registers" in r else "-",
              r.get("shared", "-"), r.get("tensor_core_ops", "-"), r["status"] + (f": {r['error']}" if "error" in r else "")]
             for r in rows]
    lines.append(markdown_table(["case", "kernel", "flags", "config", "regs/thread", "spill bytes", "shared bytes",
                                 "MMA instrs", "status"], table))
    return "\n".join(lines) + "\n"


def check_cases(cases):
    """--cases must compile as a regular expression (checked by `bench compile` before this process starts)."""
    try:
        re.compile(cases)
    except re.error as e:
        raise UserError(f"--cases {cases!r} is not a regular expression: {e}") from None


def main(argv=None):
    # run as `tritongpt bench compile`'s child process (_require_compiled_mode): its errors name that command
    p = argparse.ArgumentParser(prog="tritongpt bench compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED_BYTES),
                   help="compute capability x10 (default %(default)s: H100/H200; 80: A100; 86/89: RTX 30xx/40xx, L4; "
                        "75/70: T4, V100, checked in fp16 rather than bf16)")
    p.add_argument("--quick", action="store_true",
                   help="bf16 (fp16 below sm80), a few sizes and the shapes GPT-2 small uses")
    p.add_argument("--one-config", action="store_true",
                   help="build each launch's configs one at a time until one is clean, each launch starting at "
                        "another of its kernel's configs, then each kernel config not yet built once: the same "
                        "verdicts from under a third of the builds (the suite's check); the rows list only the "
                        "configs built")
    p.add_argument("--out", default=None, help="write compile.json and compile.md under OUT/sm<arch>-offline/")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count, at most 8)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a launch has no clean config")
    p.add_argument("--cases", default=None, metavar="REGEX",
                   help="only the launches whose case matches (re.search), e.g. 'attention .* hd256': a quick "
                        "look at one change; its compile.md says it is partial")
    args = p.parse_args(argv)
    if args.cases is not None:
        try:
            check_cases(args.cases)
        except UserError as e:
            p.error(str(e))
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be a positive integer, got {args.workers}")
    if args.out:
        from tritongpt.bench.common import check_out_dir

        try:
            check_out_dir(args.out)
        except UserError as e:
            p.error(str(e))
    _require_compiled_mode()
    import json

    env = environment(args.arch)
    if args.cases is not None:
        env["cases"] = args.cases
    if args.one_config:
        env["one_config"] = True
    try:
        rows, judged = run_check(args.arch, args.quick, args.workers, cases=args.cases,
                                 one_config=args.one_config)
    except UserError as e:  # one line, as the command line's other errors (not argparse's usage)
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = markdown(env, rows, judged)
    n_warn = sum(r["status"] != "ok" for r in rows)
    print(f"{sum(judged.values())}/{len(judged)} launches have a clean config; "
          f"{n_warn} of {len(rows)} configs are not clean (errors, spills or over the SM's limits)")
    for (case, kernel, flags), ok in judged.items():
        if not ok:
            print(f"  NO CLEAN CONFIG: {case} / {kernel} [{flags}]")
    if args.out:
        folder = Path(args.out) / f"sm{args.arch}-offline"
        folder.mkdir(parents=True, exist_ok=True)
        data = {"schema": "tritongpt-compile/1", "env": env, "rows": rows,
                "launches": [{"case": c, "kernel": k, "variant": v, "clean_config": ok}
                             for (c, k, v), ok in judged.items()]}
        (folder / "compile.json").write_text(json.dumps(data, indent=1) + "\n")
        (folder / "compile.md").write_text(text)
        print(f"wrote {folder / 'compile.json'} and {folder / 'compile.md'}")
    return 1 if args.strict and not all(judged.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
