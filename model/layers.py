"""Reference building blocks of GPT-2, written to be read.

Each module is the textbook version. The modules that have a Triton twin carry a flag,
`use_triton`, that GPTModel.set_kernels() flips; the parameters are the same either way, so
a state_dict moves freely between the two paths.

    LayerNorm           <->  kernels/layernorm.py   (layer_norm; add_and_norm <-> add_layer_norm)
    RMSNorm             <->  kernels/layernorm.py   (rms_norm; add_and_norm <-> add_rms_norm: the same kernels, IS_RMS)
    FeedForward         <->  kernels/mlp.py         (gelu_mlp: Linear+bias+GELU fused, GELU recomputed in backward;
                                                     GELU: the tanh form or the exact one, approximate "none";
                                                     activation "relu2": ReLU2, relu(h)^2, in the same epilogues)
    SwiGLUFeedForward   <->  kernels/swiglu.py      (swiglu_mlp: gate and up in one pass, silu(g) * u fused;
                                                     GeGLU's gelu(g) * u too)
    MoEFeedForward      <->  kernels/moe.py         (routing in torch; moe_mlp: every expert in grouped GEMMs over
                                                     the assignments sorted by expert, the weighted sum in torch;
                                                     Qwen2-MoE's shared expert a SwiGLUFeedForward: kernels/swiglu.py)
    MXFP4MoEFeedForward <->  kernels/moe.py         (moe_mlp_mxfp4: GPT-OSS's experts kept MXFP4, each weight tile
                                                     decoded in registers in the same grouped kernel; dx only)
    MultiHeadAttention  <->  kernels/attention.py   (flash_attention: only the attention core is swapped;
                                                     its q/k norms are GPTConfig.norm's, RMSNorm or LayerNorm:
                                                     per head, OLMo 2's rows of n_head * head_dim, or
                                                     PerHeadNorm's weights a head)
    NoNorm              --   no kernel: OLMo 2's absent pre-norm, a plain residual add
    Rotary (apply_rotary) <-> kernels/rope.py       (rope: q and k rotated in one launch)
    out_head + lm_loss (model/gpt.py) <->  kernels/cross_entropy.py (linear_cross_entropy: never all the logits at once;
                                                     its bias too, GPTConfig.head_bias)
    Int8Linear (model/quant.py) <-> kernels/quant.py (int8_linear: weight-only int8, dequantized in registers;
                                                     quantize_int8 swaps the Linears in; inference only)
    Int4Linear (model/quant.py) <-> kernels/quant.py (int4_linear: 4-bit groups unpacked in registers;
                                                     quantize_int4)
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tritongpt._types import is_int
from tritongpt.model.lora import AdapterLinear
from tritongpt.model.quant import QuantLinear


def _fp32_if_fp16(t):
    """t in fp32 when it is fp16, else unchanged. fp16 tops out at 65504: a variance, a cube or
    a q.k that passes it becomes inf (then 0 or NaN), where PyTorch's own ops (F.layer_norm,
    F.gelu, SDPA) compute in fp32 and the Triton kernels do too. bf16 has fp32's range, and
    fp32/fp64 stay as they are."""
    return t.float() if t.dtype == torch.float16 else t


def _fp32_if_half(t):
    """t in fp32 when it is fp16 or bf16, else unchanged (fp32, fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _autocast_off_for_fp16(t):
    """A context with autocast off on t's device when t is fp16 and autocast is on there (it
    would cast an fp32 matmul back to fp16); else nothing. (No autocast on meta tensors: asking
    raises there.)"""
    dev = t.device.type
    if t.dtype == torch.float16 and dev != "meta" and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last dimension.

    The variance is the biased one (divide by N), as in GPT-2. bias False: no bias parameter (MPT's).
    Triton twin: kernels/layernorm.py.
    """

    def __init__(self, n_embd: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.use_triton = False

    def forward(self, x):
        if self.use_triton:
            from tritongpt.kernels.layernorm import layer_norm

            return layer_norm(x, self.weight, self.bias, self.eps)
        xf = _fp32_if_fp16(x)  # an fp16 variance overflows at a spread of 256
        mean = xf.mean(dim=-1, keepdim=True)
        xc = xf - mean
        # the mean of squares, not Tensor.var: that warns on a batch of zero-length sequences
        var = (xc * xc).mean(dim=-1, keepdim=True)
        x_hat = (xc / torch.sqrt(var + self.eps)).to(x.dtype)
        return x_hat * self.weight if self.bias is None else x_hat * self.weight + self.bias

    def add_and_norm(self, x, delta):
        """(x + delta, LayerNorm(x + delta)): a residual add and the LayerNorm that reads it.
        Triton twin: kernels/layernorm.py `add_layer_norm`, one pass over memory for both."""
        if self.use_triton:
            from tritongpt.kernels.layernorm import add_layer_norm

            return add_layer_norm(x, delta, self.weight, self.bias, self.eps)
        x = x + delta
        return x, self(x)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension (Llama, Gemma,
    modded-nanogpt): LayerNorm without the mean subtracted and without a bias.

    Triton twin: kernels/layernorm.py `rms_norm` (the LayerNorm kernels with IS_RMS)."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.use_triton = False

    def forward(self, x):
        if self.use_triton:
            from tritongpt.kernels.layernorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        xf = _fp32_if_fp16(x)  # an fp16 mean square overflows past |x| = 256, as LayerNorm's variance
        x_hat = (xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return x_hat * self.weight

    def add_and_norm(self, x, delta):
        """(x + delta, RMSNorm(x + delta)), as LayerNorm.add_and_norm. Triton twin:
        kernels/layernorm.py `add_rms_norm`."""
        if self.use_triton:
            from tritongpt.kernels.layernorm import add_rms_norm

            return add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


class NoNorm(nn.Module):
    """The input norm a block without pre-norms (OLMo 2, 3: GPTConfig.pre_norms False) lacks: y = x,
    and add_and_norm(x, delta) = (x + delta, x + delta), the residual add the norm would have made.
    No weights; no kernel of its own (the add is PyTorch's on either path)."""

    def forward(self, x):
        return x

    def add_and_norm(self, x, delta):
        x = x + delta
        return x, x


class PerHeadNorm(nn.Module):
    """A q or k norm with weights of each head's own (GPTConfig.qk_norm_width "each": StableLM 2 12B's
    StableLmLayerNormPerHead, Command R+'s CohereLayerNorm over (heads, head_dim)): on [..., heads, head_dim],
    each row normalized over head_dim (LayerNorm, or RMSNorm with rms), then times weight [heads, head_dim].
    No bias: neither family has one. Triton path: the LayerNorm/RMSNorm kernel with a ones weight, the
    per-head weight multiplied after in torch (autograd gives its gradient)."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5, rms: bool = False):
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.use_triton = False
        self._ones = {}  # (device, dtype) -> the kernel's unit weight, made once rather than every forward

    def forward(self, x):
        if x.shape[-2:] != self.weight.shape:
            raise ValueError(f"PerHeadNorm: x ends in {tuple(x.shape[-2:])}, the weight is {tuple(self.weight.shape)}")
        if self.use_triton:
            from tritongpt.kernels.layernorm import layer_norm, rms_norm

            key = (x.device, self.weight.dtype)
            if key not in self._ones:
                self._ones[key] = torch.ones(x.size(-1), device=x.device, dtype=self.weight.dtype)
            ones = self._ones[key]
            x_hat = rms_norm(x, ones, self.eps) if self.rms else layer_norm(x, ones, None, self.eps)
            return x_hat * self.weight
        xf = _fp32_if_fp16(x)  # fp16 overflows, as LayerNorm's and RMSNorm's
        if not self.rms:
            xf = xf - xf.mean(dim=-1, keepdim=True)
        x_hat = (xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return x_hat * self.weight


NORM_MODULES = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}  # by GPTConfig.norm (config.NORMS)


def make_norm(cfg, width: int = 0):
    """The norm GPTConfig.norm names, of width n_embd: a block's two, the model's final one (and BLOOM's
    embed_norm; width: a q/k norm's); a LayerNorm without a bias when GPTConfig.norm_bias is False."""
    if cfg.norm == "layernorm":
        return LayerNorm(width or cfg.n_embd, cfg.norm_eps, bias=cfg.norm_bias)
    return NORM_MODULES[cfg.norm](width or cfg.n_embd, cfg.norm_eps)


def qk_norm_factory(cfg):
    """The q/k norms' maker MultiHeadAttention calls: width -> make_norm's, or with qk_norm_width "each"
    (heads, head_dim) -> a PerHeadNorm of GPTConfig.norm's kind (bias-free, whatever norm_bias says)."""
    if cfg.qk_norm_width == "each":
        return lambda heads, head_dim: PerHeadNorm(heads, head_dim, cfg.norm_eps, rms=cfg.norm == "rmsnorm")
    return lambda width: make_norm(cfg, width)


class GELU(nn.Module):
    """GELU with GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); with
    approximate "none" the exact one, x Phi(x) = 0.5 x (1 + erf(x / sqrt(2))) (GPT-NeoX's, Pythia's "gelu").
    Triton twin: kernels/mlp.py's epilogues (fused into FeedForward's first matmul, GELU_ERF for the erf)."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        assert approximate in ("tanh", "none"), "approximate must be 'tanh' or 'none' (F.gelu's names)"
        self.approximate = approximate

    def forward(self, x):
        xf = _fp32_if_fp16(x)  # in fp16, x^3 overflows past |x| = 40 and its gradient 3x^2 past 256
        if self.approximate == "none":
            return (0.5 * xf * (1.0 + torch.erf(xf / math.sqrt(2.0)))).to(x.dtype)
        return (0.5 * xf * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf.pow(3))))).to(x.dtype)


class ReLU2(nn.Module):
    """The squared ReLU, relu(x)^2 (Arcee's AFM, NVIDIA's Nemotron, the modded-nanoGPT speedruns); its
    derivative is 2 relu(x). Triton twin: kernels/mlp.py's epilogues (RELU2)."""

    approximate = "relu2"  # what kernels/mlp.py's gelu_mlp calls this activation (relu2_mlp)

    def forward(self, x):
        r = F.relu(_fp32_if_fp16(x))  # in fp16, r^2 of an r the dtype holds may overflow; fp32 then one rounding
        return (r * r).to(x.dtype)


MLP_ACTIVATIONS = ("gelu", "relu2")  # FeedForward's


class FeedForward(nn.Module):
    """Position-wise MLP: Linear(C -> 4C), GELU, Linear(4C -> C), dropout. approximate: the GELU's
    form, GPT-2's "tanh" or the exact "none" (GPTConfig.gelu_approximate). activation "relu2": the
    squared ReLU in the GELU's place (GPTConfig.mlp "relu2"; approximate then unused). hidden: the
    hidden width, 0 for GPT-2's 4C (Arcee's intermediate_size otherwise).

    Triton twin: kernels/mlp.py, which fuses the first Linear's bias and the activation into the
    matmul and keeps only the pre-activation for backward (the activation is recomputed there).
    """

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True, approximate: str = "tanh",
                 hidden: int = 0, activation: str = "gelu"):
        super().__init__()
        assert activation in MLP_ACTIVATIONS, f"activation must be one of {', '.join(MLP_ACTIVATIONS)}"
        hidden = hidden or 4 * n_embd
        self.fc1 = nn.Linear(n_embd, hidden, bias=bias)
        self.act = ReLU2() if activation == "relu2" else GELU(approximate)
        self.fc2 = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.use_triton = False

    def forward(self, x):
        if isinstance(self.fc1, QuantLinear):  # int8/int4 (model/quant.py): fc1's GELU or ReLU2 in its own epilogue
            return self.drop(self.fc2(self.fc1(x, act=self.act)))
        if self.use_triton and not any(isinstance(m, AdapterLinear) for m in (self.fc1, self.fc2)):  # adapters: below
            from tritongpt.kernels.mlp import gelu_mlp

            return self.drop(gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                      self.act.approximate))
        return self.drop(self.fc2(self.act(self.fc1(x))))


def swiglu_hidden(n_embd: int) -> int:
    """Llama's hidden size for a SwiGLU MLP: 2/3 of GPT-2's 4C, so its three matrices hold about
    GPT-2's two's 8 C^2 parameters, rounded up to a multiple of 64 (Llama rounds to 256, which
    at a small width adds up to half again: C = 128 gives 384, not 512). C = 768 gives 2048 exactly."""
    return -(-(8 * n_embd) // (3 * 64)) * 64


GATES = {"silu": F.silu, "gelu": lambda g: F.gelu(g, approximate="tanh")}  # a gated MLP's activation


class SwiGLUFeedForward(nn.Module):
    """Llama's (PaLM's, Mistral's) MLP: w_down(silu(w_gate(x)) * w_up(x)), dropout; with
    activation "gelu", Gemma's GeGLU: w_down(gelu_tanh(w_gate(x)) * w_up(x)).

    The activation of g gates the up projection elementwise (Shazeer 2020, "GLU Variants
    Improve Transformer"). Triton twin: kernels/swiglu.py, which makes g and u in one pass over x,
    fuses act(g) * u into that matmul and keeps only g and u for backward (a is recomputed there).
    """

    def __init__(self, n_embd: int, hidden: int, dropout: float = 0.0, bias: bool = True, activation: str = "silu"):
        super().__init__()
        assert activation in GATES, f"activation must be one of {', '.join(GATES)}"
        self.activation = activation
        self.w_gate = nn.Linear(n_embd, hidden, bias=bias)
        self.w_up = nn.Linear(n_embd, hidden, bias=bias)
        self.w_down = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.use_triton = False

    def forward(self, x):
        if self.use_triton and not isinstance(self.w_gate, QuantLinear) and \
                not any(isinstance(m, AdapterLinear) for m in (self.w_gate, self.w_up, self.w_down)):  # (below)
            from tritongpt.kernels.swiglu import swiglu_mlp

            return self.drop(swiglu_mlp(x, self.w_gate.weight, self.w_gate.bias, self.w_up.weight, self.w_up.bias,
                                        self.w_down.weight, self.w_down.bias, activation=self.activation))
        return self.drop(self.w_down(GATES[self.activation](self.w_gate(x)) * self.w_up(x)))


class MoEFeedForward(nn.Module):
    """Mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE): n_experts gated MLPs and a router.

    router [E, C] scores each token; softmax over the E scores (fp32); the token goes to its top_k experts with
    those probabilities as weights, renormalized to sum to 1 over the k when norm_topk (Mixtral's). Expert e
    computes act(x Wg_e^T) * (x Wu_e^T) Wd_e^T on the tokens routed to it (no biases), each output is scaled by
    its weight and index_add'ed back to its token's row. The experts are stacked parameters w_gate, w_up
    [E, H, C] and w_down [E, C, H], the layout transformers keeps (gate_up_proj split in two).

    The router's logits of the last forward stay on the module (router_logits, [tokens, E]) for the
    load-balancing loss (load_balancing_loss), which GPTModel.forward adds when GPTConfig.moe_aux_loss is set.

    shared_hidden > 0 (Qwen2-MoE's shared expert): one more gated MLP of that width, no biases, that every token
    goes through, scaled by sigmoid(shared_gate(x)) ([C] -> 1 a token) and added to the routed sum:
    out = sum_k w_k expert_k(x) + sigmoid(x g^T) shared_expert(x). It is a SwiGLUFeedForward (w_gate, w_up,
    w_down Linears), so its Triton path is the dense MLP's kernel, kernels/swiglu.py.

    GPT-OSS (bias True, activation "gpt_oss"): the router a Linear with a bias, each expert's three products
    with biases b_gate, b_up [E, H] and b_down [E, C], and its activation a clamped SwiGLU: g = min(g, limit),
    u = clamp(u, -limit, limit), a = (u + 1) * g * sigmoid(alpha * g). Its router takes the top k logits and
    softmaxes over those k, which is the softmax over all E renormalized over the k (norm_topk True).

    Triton twin: the same routing in torch, then every expert at once through kernels/moe.py's moe_mlp (grouped
    GEMMs over the assignments sorted by expert: two launches forward, four backward, whatever E), which gives
    each token's k outputs unweighted; the weighted sum over k is torch's, as the router's gradient flows there.
    GPT-OSS's expert biases and clamped SwiGLU are that kernel's too (in its epilogues, forward and backward; the
    biases' gradients two launches more); the router's bias is the router Linear's, in torch.
    """

    def __init__(self, n_embd: int, hidden: int, n_experts: int, top_k: int, norm_topk: bool = True,
                 dropout: float = 0.0, activation: str = "silu", shared_hidden: int = 0, bias: bool = False,
                 limit: float = 7.0, alpha: float = 1.702):
        super().__init__()
        assert activation in (*GATES, "gpt_oss"), f"activation must be one of {', '.join(GATES)}, gpt_oss"
        assert 1 <= top_k <= n_experts, "top_k must be in [1, n_experts]"
        self.activation, self.n_experts, self.top_k, self.norm_topk = activation, n_experts, top_k, norm_topk
        self.limit, self.alpha = limit, alpha
        self.router = nn.Linear(n_embd, n_experts, bias=bias)
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.w_down = nn.Parameter(torch.empty(n_experts, n_embd, hidden))
        for w in (self.w_gate, self.w_up, self.w_down):  # GPTModel scales w_down's std by depth, as Linear's
            nn.init.normal_(w, mean=0.0, std=0.02)
        # GPT-OSS's expert biases (zeros at init, as transformers' GptOssExperts); None: no biases (the others)
        self.b_gate = nn.Parameter(torch.zeros(n_experts, hidden)) if bias else None
        self.b_up = nn.Parameter(torch.zeros(n_experts, hidden)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(n_experts, n_embd)) if bias else None
        # (its own dropout 0: the module's dropout is applied once, to the sum)
        self.shared_expert = SwiGLUFeedForward(n_embd, shared_hidden, 0.0, False, activation) if shared_hidden else None
        self.shared_gate = nn.Linear(n_embd, 1, bias=False) if shared_hidden else None
        self.drop = nn.Dropout(dropout)
        self.use_triton = False
        self.router_logits = None

    def __getstate__(self):
        # the last forward's router logits are part of its autograd graph while it trains: copy.deepcopy (a DPO
        # reference model, an EMA) and pickling refuse such a tensor; a copy has run no forward yet
        return {**self.__dict__, "router_logits": None}

    def route(self, x):
        """x [N, C] -> (router logits [N, E], weights [N, k] (fp32 at least), experts [N, k])."""
        logits = self.router(x)
        probs = torch.softmax(_fp32_if_half(logits), dim=-1)  # in fp32 at least, as transformers' routers
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, experts

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, weights, experts = self.route(x)
        self.router_logits = logits
        if self.use_triton:
            # y [N, k, C] unweighted (b_down in it, as _expert's); the weighted sum stays here so the router gets
            # its gradient through it
            y = self._triton_experts(x, experts)
            out = self._plus_shared(x, (y * weights[..., None].to(y.dtype)).sum(1))
            return self.drop(out.view(shape))
        # under autocast x is fp32 and each expert's output bf16 (its matmuls'): the sum is kept in x's dtype and
        # the result is the experts' dtype, as the Triton path's weighted sum of its bf16 y
        out, dtype = torch.zeros_like(x), x.dtype
        w = self._expert_weights(x.dtype)
        for e in range(self.n_experts):
            token, slot = torch.where(experts == e)
            if token.numel() == 0:  # skip an idle expert (its gradient slice stays zero)
                continue
            ye = self._expert(x[token], e, w)
            dtype = ye.dtype
            # in place: no [N, C] per expert
            out.index_add_(0, token, (ye * weights[token, slot, None].to(ye.dtype)).to(out.dtype))
        return self.drop(self._plus_shared(x, out.to(dtype)).view(shape))

    def _triton_experts(self, x, experts):
        """kernels/moe.py's y [N, k, C] for x's rows and their experts [N, k]."""
        from tritongpt.kernels.moe import moe_mlp

        # top-k's ids are in range by construction: no check (it would read a flag back from the GPU)
        return moe_mlp(x, experts, self.w_gate, self.w_up, self.w_down, self.activation, check_experts=False,
                       b_gate=self.b_gate, b_up=self.b_up, b_down=self.b_down, limit=self.limit, alpha=self.alpha)

    def _expert_weights(self, dtype):
        """(w_gate, w_up, w_down) the reference multiplies by: the parameters (MXFP4MoEFeedForward: dequantized)."""
        return self.w_gate, self.w_up, self.w_down

    def _expert(self, xe, e: int, w=None):
        """Expert e's gated MLP on its tokens' rows xe, textbook: act(g) * u, or GPT-OSS's clamped SwiGLU, with
        the biases when the layer has them. w: _expert_weights' (None: the parameters)."""
        w_gate, w_up, w_down = w if w is not None else (self.w_gate, self.w_up, self.w_down)
        g, u = xe @ w_gate[e].t(), xe @ w_up[e].t()
        if self.b_gate is not None:
            g, u = g + self.b_gate[e], u + self.b_up[e]
        if self.activation == "gpt_oss":
            # transformers' GptOssExperts._apply_gate: the gate clamped above only, the up both ways, and the
            # up's + 1 (its residual-like offset), alpha the sigmoid's gain
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
            a = (u + 1) * (g * torch.sigmoid(self.alpha * g))
        else:
            a = GATES[self.activation](g) * u
        y = a @ w_down[e].t()
        return y + self.b_down[e] if self.b_down is not None else y

    def _plus_shared(self, x, out):
        """The routed sum out [N, C] plus the shared expert's output gated by sigmoid(shared_gate(x)), when there
        is one (the order of transformers' Qwen2MoeSparseMoeBlock: routed + gated shared)."""
        if self.shared_expert is None:
            return out
        return out + torch.sigmoid(self.shared_gate(x)) * self.shared_expert(x)


class MXFP4MoEFeedForward(MoEFeedForward):
    """GPT-OSS's experts kept MXFP4, as the Hub's folders hold them (~4.25 bits a weight: gpt-oss-20b's experts
    stay ~13 GB where bf16 takes ~40): the router and the routing are MoEFeedForward's, the experts' weights the
    buffers transformers' layout names (model/quant.py dequantize_mxfp4 says the format):
      gate_up_blocks uint8 [E, 2H, C / 32, 16], gate_up_scales uint8 [E, 2H, C / 32]: rows 2j gate j's, 2j + 1
        up j's (transformers' interleave), 32 inputs a block;
      down_blocks uint8 [E, C, H / 32, 16], down_scales uint8 [E, C, H / 32];
    and the float biases b_gate, b_up [E, H], b_down [E, C]. Everything of the experts is frozen (buffers, as
    QuantLinear's): x gets its gradient, the router and the rest of the model train (LoRA on attention); w_gate,
    w_up and w_down are None (no float copy is kept).

    Reference: the weights dequantized into x's dtype each forward (bit for bit hf_quant.mxfp4_dequantize's values,
    so the model is exactly the folder's dequantized one), then MoEFeedForward's float math. Triton twin:
    kernels/moe.py moe_mlp_mxfp4, the grouped kernel decoding each weight tile in registers (dx-only backward)."""

    def __init__(self, n_embd: int, hidden: int, n_experts: int, top_k: int, norm_topk: bool = True,
                 dropout: float = 0.0, limit: float = 7.0, alpha: float = 1.702, device=None,
                 dtype=torch.float32):
        nn.Module.__init__(self)
        for name, width in (("n_embd", n_embd), ("hidden", hidden)):
            if width % 32:  # (an expert's inputs are C for gate and up, H for down: each whole blocks of 32)
                raise ValueError(f"MXFP4 experts: {name} {width} is not a multiple of 32, MXFP4's block")
        assert 1 <= top_k <= n_experts, "top_k must be in [1, n_experts]"
        self.activation, self.n_experts, self.top_k, self.norm_topk = "gpt_oss", n_experts, top_k, norm_topk
        self.limit, self.alpha = limit, alpha
        self.router = nn.Linear(n_embd, n_experts, bias=True, device=device, dtype=dtype)
        E, C, H = n_experts, n_embd, hidden
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("gate_up_blocks", torch.zeros(E, 2 * H, C // 32, 16, **u8))
        self.register_buffer("gate_up_scales", torch.full((E, 2 * H, C // 32), 127, **u8))
        self.register_buffer("down_blocks", torch.zeros(E, C, H // 32, 16, **u8))
        self.register_buffer("down_scales", torch.full((E, C, H // 32), 127, **u8))
        for name, shape in (("b_gate", (E, H)), ("b_up", (E, H)), ("b_down", (E, C))):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.w_gate = self.w_up = self.w_down = None
        self.shared_expert = self.shared_gate = None
        self.drop = nn.Dropout(dropout)
        self.use_triton = False
        self.router_logits = None

    def set_packed(self, gate_up_blocks, gate_up_scales, down_blocks, down_scales, what: str = "MXFP4 experts"):
        """Copy the packed experts in, each of its buffer's shape and uint8, else a UserError naming it (what: whose,
        for the message); a scale of 255 (e8m0's NaN) or a value past float range refused as a damaged file."""
        from tritongpt.errors import UserError

        for name, t in zip(("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales"),
                           (gate_up_blocks, gate_up_scales, down_blocks, down_scales)):
            buf = getattr(self, name)
            if t.dtype != torch.uint8 or t.shape != buf.shape:
                raise UserError(f"{what}: {name} is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, not uint8 "
                                f"{tuple(buf.shape)} (experts, rows, inputs / 32" +
                                (", 16: 32 FP4 codes a block, two a byte)" if name.endswith("blocks") else
                                 ": one e8m0 exponent a block of 32)"))
            if name.endswith("scales") and t.numel() and int(t.max()) == 255:
                raise UserError(f"{what}: {name} holds 255, e8m0's NaN (a damaged file)")
        for blocks, scales in ((gate_up_blocks, gate_up_scales), (down_blocks, down_scales)):
            # a value of 2 ** 128 or more (float32's inf) needs a scale of 253 or 254: only those blocks decoded
            high = scales >= 253
            if bool(high.any()):
                from tritongpt.model.quant import dequantize_mxfp4

                if not bool(torch.isfinite(dequantize_mxfp4(blocks[high].view(1, -1, 1, 16),
                                                            scales[high].view(1, -1, 1))).all()):
                    raise UserError(f"{what}: a value is 2 ** 128 or more (a scale of 253 or 254 and a large code), "
                                    "beyond float range (a damaged file)")
        with torch.no_grad():
            for name, t in zip(("gate_up_blocks", "gate_up_scales", "down_blocks", "down_scales"),
                               (gate_up_blocks, gate_up_scales, down_blocks, down_scales)):
                getattr(self, name).copy_(t)

    def _expert_weights(self, dtype):
        """(w_gate, w_up [E, H, C], w_down [E, C, H]) dequantized into dtype (exact in float32, bfloat16 and float64,
        which hold every MXFP4 value below 2 ** 128; float16 rounds them, as the Triton path's tiles do)."""
        from tritongpt.model.quant import dequantize_mxfp4

        gate_up = dequantize_mxfp4(self.gate_up_blocks, self.gate_up_scales, dtype)
        return gate_up[:, 0::2], gate_up[:, 1::2], dequantize_mxfp4(self.down_blocks, self.down_scales, dtype)

    def _triton_experts(self, x, experts):
        from tritongpt.kernels.moe import moe_mlp_mxfp4

        return moe_mlp_mxfp4(x, experts, self.gate_up_blocks, self.gate_up_scales, self.down_blocks,
                             self.down_scales, check_experts=False, b_gate=self.b_gate.to(x.dtype),
                             b_up=self.b_up.to(x.dtype), b_down=self.b_down.to(x.dtype), limit=self.limit,
                             alpha=self.alpha)

    def packed_bytes(self) -> int:
        """The experts' weight bytes as kept (blocks and scales; the biases are float as ever)."""
        return sum(t.numel() for t in (self.gate_up_blocks, self.gate_up_scales, self.down_blocks, self.down_scales))

    def extra_repr(self) -> str:
        E, H2, G = self.gate_up_scales.shape
        return f"experts={E}, n_embd={G * 32}, hidden={H2 // 2}, top_k={self.top_k}, mxfp4"


def load_balancing_loss(router_logits, top_k: int, mask=None):
    """Switch Transformer's load-balancing loss over layers' router logits (a list of [N, E]), as transformers'
    load_balancing_loss_func computes it: E * sum_e f_e P_e, f_e the share of the top-k assignments expert e
    got and P_e its mean router probability, both averaged over every layer's tokens together. 1 per chosen
    expert (k) when the load is even; the gradient flows through P only (f counts).

    mask: None, or [N] (any shape of N elements: the forward's [B, T]) true at the tokens to count, as
    load_balancing_loss_func's attention_mask: a padded batch's pad tokens are left out of both f and P, so the
    routers do not train on them. No counted token at all gives 0 (not 0 / 0)."""
    n_experts = router_logits[0].shape[-1]
    counts = _fp32_if_half(router_logits[0]).new_zeros(n_experts)
    prob_sum = torch.zeros_like(counts)
    w = None if mask is None else mask.reshape(-1, 1).to(counts.dtype)  # [N, 1]: a token's weight, 0 or 1
    rows = 0
    for logits in router_logits:
        probs = torch.softmax(_fp32_if_half(logits), dim=-1)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, n_experts).sum(1).to(counts.dtype)  # [N, E]
        if w is not None:
            probs, chosen = probs * w, chosen * w
        counts = counts + chosen.sum(0)
        prob_sum = prob_sum + probs.sum(0)
        rows += probs.shape[0] if w is None else w.sum()
    if w is not None:
        rows = rows.clamp_min(1)  # an all-padding batch: counts and probabilities 0, the loss 0
    return n_experts * torch.sum((counts / rows) * (prob_sum / rows))


def rope_inv_freq(head_dim: int, theta: float, device=None, scaling: dict | None = None,
                  seq_len: int | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2i/D), i < D/2, as fp32 [D/2], rescaled by `scaling`
    (GPTConfig.rope_scaling) if given: computed in float64 and rounded once, so this reference
    and the kernel (kernels/rope.py) use the same numbers. head_dim: the rotated width (GPTConfig.rotary_dim
    under partial rotary: the frequencies are over it, not the head's). seq_len: LongRoPE's (rope_seq_len)."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)
    inv_freq = float(theta) ** (-i / head_dim)
    return (inv_freq if scaling is None else scaled_inv_freq(inv_freq, scaling, theta, seq_len)).float()


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict, theta: float | None = None,
                    seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies stretched for a longer context, as transformers computes them
    (modeling_rope_utils): "linear" divides them all by factor (positions interpolated); "llama3"
    (Llama 3.1, 3.2) divides the low ones by factor, keeps the high ones, and blends between:
    a wavelength 2 pi / f past original_max_position_embeddings / low_freq_factor is stretched,
    one under original_max_position_embeddings / high_freq_factor kept, and the ones between mix
    the two by where they fall. The angles stay pos * inv_freq; "yarn" (theta: RoPE's base) is
    yarn_inv_freq, whose attention_factor MultiHeadAttention applies; "longrope" is longrope_inv_freq."""
    if scaling["rope_type"] == "longrope":
        return longrope_inv_freq(inv_freq, scaling, seq_len)
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    if scaling["rope_type"] == "yarn":
        return yarn_inv_freq(inv_freq, scaling, theta)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, stretched)


def yarn_inv_freq(inv_freq: torch.Tensor, scaling: dict, theta: float) -> torch.Tensor:
    """YaRN's frequencies (Peng et al. 2023), as transformers' _compute_yarn_parameters: the dimensions that
    turn more than beta_fast times over the original context keep their frequency, those under beta_slow
    turns are divided by factor, and a linear ramp over the dimension index blends the ones between
    (bounds rounded out: floor and ceil, unless the spec says truncate false, GPT-OSS's: then the ramp starts
    and ends between dimensions). Its attention_factor multiplies cos and sin, so the scores by its square:
    MultiHeadAttention's softmax_scale takes that, on either kernel path."""
    dim = 2 * inv_freq.numel()
    context = scaling["original_max_position_embeddings"]

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` turns in the context
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=inv_freq.dtype, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    return inv_freq / scaling["factor"] * ramp + inv_freq * (1 - ramp)


def longrope_inv_freq(inv_freq: torch.Tensor, scaling: dict, seq_len: int | None) -> torch.Tensor:
    """LongRoPE's frequencies (Phi-3, Phi-3.5, Phi-4-mini), as transformers' _compute_longrope_parameters:
    each divided by its own factor, long_factor's when the sequence is longer than
    original_max_position_embeddings, else short_factor's. One vector for a whole forward: transformers picks
    it from max(position_ids) + 1 (longrope_frequency_update), which seq_len is (rope_seq_len). Its
    attention_factor multiplies cos and sin: MultiHeadAttention's softmax_scale takes its square, as YaRN's."""
    long = seq_len is not None and seq_len > scaling["original_max_position_embeddings"]
    ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=inv_freq.dtype, device=inv_freq.device)
    return inv_freq / ext


def rope_seq_len(positions, T: int) -> int:
    """The length LongRoPE picks its vector by, transformers' max(position_ids) + 1: start + T for an int
    start (a KV cache's fill); for a positions tensor int(max) + 1, which waits for the device (one sync)."""
    if not isinstance(positions, torch.Tensor):
        return int(positions) + T
    return int(positions.max()) + 1 if positions.numel() else 0


def checked_seq_len(seq_len, who: str) -> None:
    """seq_len (LongRoPE's length) as both RoPE paths take it: None or an int, not a bool. Checked whatever the
    scaling: otherwise a "4" was ignored unless LongRoPE, and there compared with original_max_position_embeddings
    as given (a float, True as 1)."""
    if seq_len is not None and not is_int(seq_len):
        raise TypeError(f"{who}: seq_len must be an int, got {type(seq_len).__name__} {seq_len!r} (LongRoPE's "
                        "length, or None)")


def is_longrope(scaling) -> bool:
    return bool(scaling) and scaling["rope_type"] == "longrope"


def apply_rotary(x, positions, theta: float = 10000.0, scaling: dict | None = None, rotary_dim: int = 0,
                 seq_len: int | None = None, mscale: float = 1.0):
    """Rotary position embedding (RoPE, Su et al. 2021) of x [..., T, D] at positions [T] or [B, T]
    (for x [B, H, T, D]), in the half-split convention of GPT-NeoX and Llama (`rotate_half`):
    dimensions i and i + D/2 form a pair, rotated by the angle pos * theta^(-2i/D). The angles,
    their cos/sin and the rotation are computed in fp32 (float64 for float64 x), the result is in
    x's dtype. scaling: GPTConfig.rope_scaling's stretch of the frequencies (scaled_inv_freq; seq_len: LongRoPE's
    length, max(positions) + 1 when None). rotary_dim R < D (partial rotary, GPT-NeoX's rotary_pct): only
    x[..., :R] is rotated, pairs (i, i + R/2) at pos * theta^(-2i/R), and x[..., R:] passes through.
    mscale: cos and sin multiplied by it (transformers' attention_scaling, under partial rotary).
    Triton twin: kernels/rope.py `rope` (q and k in one launch)."""
    D = x.shape[-1]
    checked_seq_len(seq_len, "apply_rotary")
    if rotary_dim and rotary_dim != D:
        return torch.cat([apply_rotary(x[..., :rotary_dim], positions, theta, scaling, 0, seq_len, mscale),
                          x[..., rotary_dim:]], dim=-1)
    if is_longrope(scaling) and seq_len is None:
        seq_len = rope_seq_len(positions, 0)
    # [T or B x T, D/2], fp32
    angles = positions.float()[..., None] * rope_inv_freq(D, theta, x.device, scaling, seq_len)
    if angles.dim() == 3:  # per sequence: [B, 1, T, D/2], one row of angles for every head
        angles = angles[:, None]
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    cos, sin = angles.cos().to(xf.dtype), angles.sin().to(xf.dtype)
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    x1, x2 = xf[..., :D // 2], xf[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Rotary(nn.Module):
    """RoPE of a head's queries and keys (apply_rotary to each); no parameters. Triton twin:
    kernels/rope.py `rope`, which rotates both in one launch and computes cos/sin in the kernel."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: dict | None = None, rotary_dim: int = 0,
                 mscale: float = 1.0):
        super().__init__()
        # rotary_dim: partial rotary, the first rotary_dim dimensions of a head rotated (0: all of them)
        self.rotary_dim = rotary_dim or head_dim
        assert self.rotary_dim % 2 == 0 and self.rotary_dim <= head_dim, \
            "RoPE rotates pairs of dimensions: rotary_dim (or head_dim) must be even and at most head_dim"
        self.head_dim, self.theta, self.scaling, self.mscale = head_dim, theta, scaling, mscale
        self.use_triton = False

    def forward(self, q, k, positions, seq_len: int | None = None):
        """positions: [T] or [B, T], or an int start (T tokens from it), as `rope` takes them. seq_len: LongRoPE's
        length (GPTModel computes it once a forward); None: from positions here."""
        if not isinstance(positions, torch.Tensor) and not is_int(positions):
            # as rope() refuses it: a start of 2.5 made fractional positions here (and LongRoPE's length int(2.5) + T)
            raise TypeError(f"Rotary: positions must be an int (a start offset) or an integer tensor [T] or [B, T], "
                            f"got {type(positions).__name__} {positions!r}")
        if is_longrope(self.scaling) and seq_len is None:
            seq_len = rope_seq_len(positions, q.shape[-2])
        if not isinstance(positions, torch.Tensor) and not self.use_triton:  # rope() takes a start as it is
            positions = torch.arange(positions, positions + q.shape[-2], device=q.device)
        if self.use_triton:
            from tritongpt.kernels.rope import rope

            return rope(q, k, positions, self.theta, self.scaling, self.rotary_dim, seq_len, self.mscale)
        return (apply_rotary(q, positions, self.theta, self.scaling, self.rotary_dim, seq_len, self.mscale),
                apply_rotary(k, positions, self.theta, self.scaling, self.rotary_dim, seq_len, self.mscale))


def document_index(doc_ids):
    """Packed documents: a run of equal ids is one document. -> [B, T] the index of each
    position's document in its row (0, 0, 1, 1, 1, 2, ...): a new one wherever the id changes."""
    changes = torch.zeros_like(doc_ids, dtype=torch.long)
    changes[:, 1:] = (doc_ids[:, 1:] != doc_ids[:, :-1]).long()
    return changes.cumsum(1)


def query_positions(Tq, Tk, device=None, kv_len=None):
    """[Tq, 1]: query i's position, Tk - Tq + i (the KV cache's alignment: the queries are the last Tq
    positions), or kv_len - Tq + i where only the first kv_len [1] of Tk positions are filled; with one
    kv_len a batch row ([B], continuous batching) [B, 1, Tq, 1], each row's own."""
    if kv_len is None:
        return torch.arange(Tk - Tq, Tk, device=device)[:, None]
    pos = (kv_len.reshape(-1, 1) - Tq + torch.arange(Tq, device=kv_len.device))[..., None]  # [n, Tq, 1]
    return pos[0] if kv_len.numel() == 1 else pos[:, None]


def gather_pages(pool, table):
    """A paged cache's pool [pages, kv_heads, page_size(, head_dim)] read as rows [B, kv_heads, pages a row *
    page_size(, head_dim)], row b's positions from the pages table[b] names (model/gpt.py PagedKVCache). A copy:
    the textbook read (flash_attention(block_table=) reads the pages in place)."""
    rows = pool[table.long()]  # [B, pages a row, kv_heads, page_size(, head_dim)]
    rows = rows.transpose(1, 2)
    return rows.reshape(*rows.shape[:2], -1, *rows.shape[4:])


def past_the_fill(Tk, kv_len):
    """[Tk, 1] ([B, 1, Tk, 1] for one kv_len a row): True at the positions at and past a cache's fill kv_len,
    whose stale keys and values may be inf or NaN: masked scores hide them, but a weight 0 times NaN is still
    NaN, so they are zeroed too."""
    past = torch.arange(Tk, device=kv_len.device) >= kv_len.reshape(-1, 1)  # [n, Tk]
    return past[0, :, None] if kv_len.numel() == 1 else past[:, None, :, None]


def in_the_future(Tq, Tk, device=None, kv_len=None):
    """The causal mask: [Tq, Tk] True where key j comes after query i (at query_positions' position:
    the keys past kv_len too). Made per call at the sequence's size, not stored for the whole
    context: a [context, context] buffer a layer would be 17 GB at Llama 3's 131072 positions."""
    return torch.arange(Tk, device=device)[None, :] > query_positions(Tq, Tk, device, kv_len)


def outside_window(Tq, Tk, window, device=None, kv_len=None):
    """Local attention over the last `window` positions: [Tq, Tk] True where key j is `window` or
    more positions before query i (at query_positions' position)."""
    return torch.arange(Tk, device=device)[None, :] <= query_positions(Tq, Tk, device, kv_len) - window


def document_starts(doc_ids):
    """[B, T]: the first position of each position's document (GPTModel counts each document's
    positions from it)."""
    B, T = doc_ids.shape
    pos = torch.arange(T, device=doc_ids.device).expand(B, T)
    first = document_index(doc_ids).diff(dim=1, prepend=torch.full((B, 1), -1, device=doc_ids.device)) != 0
    return torch.where(first, pos, 0).cummax(1).values


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022), fp32 [n_head]: 2^(-8 (h + 1) / n_head) for a power of
    two; otherwise BLOOM's and MPT's rule, the slopes of the power of two below, then every other slope
    of twice as many heads (transformers' build_alibi_tensor)."""
    low = 2 ** int(math.floor(math.log2(n_head)))

    def geometric(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    slopes = geometric(low) + geometric(2 * low)[0::2][:n_head - low]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes, Tq: int, Tk: int, dtype=torch.float32, kv_len=None):
    """[H, Tq, Tk]: m_h (j - i) for query i at position Tk - Tq + i (bottom-right, as the causal mask;
    kv_len - Tq + i with kv_len, query_positions) and key j; <= 0 at every visible key, 0 on the diagonal."""
    dist = torch.arange(Tk, device=slopes.device) - query_positions(Tq, Tk, slopes.device, kv_len)
    return slopes.to(dtype)[:, None, None] * dist.to(dtype)


KV_CACHE_DTYPES = ("auto", "int8")  # a KV cache's storage: "auto" the keys' own dtype; "int8" KVCache's quantized


def quantize_kv(x):
    """Keys or values [..., head_dim] as int8 with one fp32 scale per vector [...]: symmetric, scale = absmax / 127,
    x ~ q * scale (llama.cpp's q8_0 over a whole head, vLLM's int8 KV cache per token and head). A vector's error is
    at most scale / 2 an element. A vector of zeros gets scale 1 (q 0: exact, not 0 / 0). The absmax is taken in fp32,
    so an fp16/bf16 vector near its dtype's largest value is fine. A vector holding inf or NaN gets a NaN scale and
    reads back as NaN throughout (the float cache's attention would be NaN there too); no host check, which would
    sync a GPU at every layer and step.
    """
    amax = x.detach().abs().amax(dim=-1).float()  # (the max of a 16-bit tensor is exact in it)
    scale = torch.where(amax > 0, amax / 127.0, 1.0)
    scale = torch.where(torch.isfinite(amax), scale, float("nan"))
    q = torch.round(x.float() / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_kv(q, scale, dtype):
    """quantize_kv's inverse: q [..., head_dim] int8 times its scale [...], in fp32, then rounded to dtype (the
    attention's compute dtype, as the cache's float values would have been)."""
    return (q.float() * scale[..., None]).to(dtype)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention.

    Project x to queries, keys and values; split them into heads; each query attends to the
    keys at or before its own position; softmax; dropout on the attention weights; weighted
    sum of values; merge heads; output projection; dropout.

    With a KV cache the queries are only the new tokens while the keys cover the whole prefix,
    so the causal mask is aligned to the bottom-right corner: query i sits at position
    Tk - Tq + i. With a window W > 0 (local attention) a query also may not see the keys more
    than W - 1 positions back. With rope_theta (GPTConfig.position_encoding "rope") the queries
    and keys are rotated by their positions (Rotary) after the projection, before the cache
    stores the keys: the cache holds them rotated, as Llama's does. With qk_norm (Qwen3) each
    head's query and key is normalized first (qk_norm_all: OLMo 2's, the whole q and k before the
    split into heads); with head_dim (Qwen3's own width) the heads are
    head_dim wide whatever n_embd is, so q and the merged heads are n_head x head_dim. Gemma's
    two: scale_width, the scores scaled by 1/sqrt(scale_width) instead of 1/sqrt(head_dim)
    (query_pre_attn_scalar), and softcap, the scores soft-capped (attn_logit_softcapping). With sinks
    (gpt-oss's attention sinks) each head has a learned sink logit, the parameter `sinks` [n_head]: one more
    column of every query row's softmax, with no value, dropped after the softmax (attend). Triton
    twin of the attention core: kernels/attention.py (flash_attention), which never builds the
    Tq x Tk score matrix.
    """

    def __init__(self, n_embd: int, n_head: int, context_length: int, dropout: float = 0.0,
                 bias: bool = True, layer_idx: int = 0, window: int = 0, scale: bool = True,
                 qkv_bias: bool | None = None, rope_theta: float | None = None, n_kv_head: int = 0,
                 head_dim: int = 0, qk_norm=None, rope_scaling: dict | None = None, scale_width: int = 0,
                 softcap: float = 0.0, qk_norm_all: bool = False, rotary_dim: int = 0, alibi: bool = False,
                 alibi_scale: float = 1.0, qk_norm_each: bool = False, multiplier: float = 0.0,
                 sinks: bool = False):
        super().__init__()
        assert head_dim or n_embd % n_head == 0, "n_embd must be divisible by n_head"
        # head_dim 0: n_embd / n_head; else its own (Qwen3), q, k and v n_head * head_dim wide
        self.n_head, self.head_dim, self.layer_idx = n_head, head_dim or n_embd // n_head, layer_idx
        self.n_kv_head = n_kv_head or n_head  # fewer: grouped-query attention (1: multi-query)
        assert n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.window = window
        # scale False: GPT-Neo's scores q.k, unscaled (its training kept them in range without);
        # scale_width: Gemma's query_pre_attn_scalar, the scale 1/sqrt of a width other than head_dim's
        self.softmax_scale = 1.0 / math.sqrt(scale_width or self.head_dim) if scale else 1.0
        if multiplier:  # Granite's attention_multiplier: the scale itself (the Triton kernel takes it as its own)
            self.softmax_scale = multiplier
        mscale = 1.0
        if rope_theta is not None and rope_scaling and rope_scaling["rope_type"] in ("yarn", "longrope"):
            # YaRN and LongRoPE multiply cos and sin by attention_factor: q.k by its square, or under partial
            # rotary only the rotated columns' share of it (the pass-through ones are not scaled)
            if rotary_dim and rotary_dim != self.head_dim:
                mscale = rope_scaling["attention_factor"]
            else:
                self.softmax_scale *= rope_scaling["attention_factor"] ** 2
        self.softcap = softcap  # > 0: each scaled score s read as softcap * tanh(s / softcap) (Gemma 2)
        qkv_bias = bias if qkv_bias is None else qkv_bias  # None: as the other projections (GPT-2)
        self.W_query = nn.Linear(n_embd, n_head * self.head_dim, bias=qkv_bias)
        self.W_key = nn.Linear(n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(n_embd, self.n_kv_head * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=bias)
        # qk_norm(width) -> a norm module (Qwen3's RMSNorm): each head's q and k normalized before RoPE;
        # qk_norm_all (OLMo 2's): the whole q and k, one norm over all their heads
        self.qk_norm_all = qk_norm_all
        q_width, k_width = (n_head * self.head_dim, self.n_kv_head * self.head_dim) if qk_norm_all else \
            (self.head_dim, self.head_dim)
        if qk_norm is not None and qk_norm_each:  # StableLM 2 12B's, Command R+'s: a weight per head
            self.q_norm, self.k_norm = qk_norm(n_head, self.head_dim), qk_norm(self.n_kv_head, self.head_dim)
        else:
            self.q_norm = qk_norm(q_width) if qk_norm is not None else None
            self.k_norm = qk_norm(k_width) if qk_norm is not None else None
        self.rotary = None if rope_theta is None else Rotary(self.head_dim, rope_theta, rope_scaling, rotary_dim,
                                                                 mscale)
        # alibi (BLOOM, MPT): each head's scores get ALiBi's bias. Its slopes are a function of n_head times
        # alibi_scale (Falcon-RW's 1/sqrt(head_dim)), not state: no parameter or buffer (which model.to(dtype) would
        # round, and a model built on the meta device leave unset), but an fp32 copy made once per device
        self.alibi, self.alibi_scale = alibi, alibi_scale
        self._alibi_slopes = {}  # device -> alibi_slopes(n_head) * alibi_scale, fp32
        # gpt-oss's attention sinks: a logit per query head that every row's softmax also normalizes over, so a head
        # can put weight "nowhere" instead of on some token (GPTConfig.attention_sinks). Initialized as transformers
        # initializes GptOssAttention.sinks for a fresh model (normal, std 0.02); a checkpoint's replace them
        self.sinks = nn.Parameter(torch.randn(n_head) * 0.02) if sinks else None
        self.attn_drop = nn.Dropout(dropout)  # both paths read its p (the Triton one in-kernel)
        self.resid_drop = nn.Dropout(dropout)
        self.use_triton = False

    def attend(self, q, k, v, doc_ids=None, kv_len=None):
        """Textbook attention core: dropout(softmax(q k^T * softmax_scale + causal mask)) v, the scale 1 / sqrt(d)
        unless __init__ sets another (1: GPT-Neo's unscaled scores; Gemma's, Granite's, YaRN's). With
        self.softcap c > 0 the scaled scores s are soft-capped to c tanh(s / c) first (Gemma 2).
        doc_ids [B, Tk]: packed documents, each a run of equal ids; a query also may not see the
        keys of another document (the document mask). self.window W > 0: nor keys W or more
        positions back (the local mask). k, v with fewer heads than q (grouped-query attention):
        each KV head is repeated for the n_head / n_kv_head query heads that share it.
        kv_len [1] (a CUDA-graph decode step's, KVCache.on_device): only the first kv_len of the Tk positions
        hold keys, and query i sits at position kv_len - Tq + i; the masks hide the rest, whatever it holds.
        kv_len [B] (a per-row fill, continuous batching): the same, each row by its own length.
        self.sinks [n_head] (gpt-oss, transformers' eager_attention_forward): head h's sink logit is one more column
        of each row's softmax, after the masks, and is dropped after it, so a row's weights sum to less than 1 (a
        row every mask hides puts all of it on the sink: weights 0, output 0). Triton twin: flash_attention(sinks=),
        folded into the kernel's epilogue (kernels/attention.py _sink_fold)."""
        if k.size(1) != q.size(1):
            k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        Tq, Tk = q.size(-2), k.size(-2)
        if kv_len is not None:
            v = v.masked_fill(past_the_fill(Tk, kv_len), 0)
        # fp16 scores in fp32 (q.k past 65504 was inf, its softmax row NaN), also under autocast,
        # which would cast the matmul back to fp16
        with _autocast_off_for_fp16(q):
            scores = _fp32_if_fp16(q) @ _fp32_if_fp16(k).transpose(-2, -1) * self.softmax_scale
        if self.softcap:  # bounds the scores within (-c, c) before the masks' -inf
            scores = self.softcap * torch.tanh(scores / self.softcap)
        if self.alibi:  # after the cap, before the masks; at least fp32 (m (j - i) reaches m T)
            scores = scores + alibi_bias(self.alibi_slopes(q.device), Tq, Tk,
                                         torch.promote_types(scores.dtype, torch.float32), kv_len)
        scores = scores.masked_fill(in_the_future(Tq, Tk, q.device, kv_len), float("-inf"))
        if doc_ids is not None:
            doc = document_index(doc_ids)  # [B, Tk]: 0 for the first document of a row, 1 for the next...
            other_doc = doc[:, Tk - Tq:, None] != doc[:, None, :]  # [B, Tq, Tk]
            scores = scores.masked_fill(other_doc[:, None], float("-inf"))
        if self.window:
            scores = scores.masked_fill(outside_window(Tq, Tk, self.window, q.device, kv_len), float("-inf"))
        if self.sinks is not None:
            sink = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
            weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            weights = torch.softmax(scores, dim=-1)
        weights = self.attn_drop(weights)
        return weights.to(v.dtype) @ v

    def alibi_slopes(self, device="cpu"):
        """This attention's ALiBi slopes on device, fp32 [n_head] (alibi_slopes times alibi_scale), made once per
        device and kept: flash_attention reads a slopes tensor's values once, to check them (a new tensor every
        call would sync a GPU in every layer)."""
        device = torch.device(device)
        if device not in self._alibi_slopes:
            self._alibi_slopes[device] = (alibi_slopes(self.n_head) * self.alibi_scale).to(device)
        return self._alibi_slopes[device]

    def forward(self, x, cache=None, doc_ids=None, positions=None, rope_len=None):
        """positions [T] or [B, T]: each token's position, for RoPE (default: from the cache's
        fill, or 0). rope_len: LongRoPE's length (layers.rope_seq_len), None: from the positions."""
        B, T, _ = x.shape
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k = self.W_query(x), self.W_key(x)
        if self.q_norm is not None and self.qk_norm_all:  # OLMo 2's: over every head at once, before the split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_all:  # per head, over head_dim: on [B, T, heads, head_dim]
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.W_value(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            if positions is None:
                start = cache.pos if cache is not None else 0
                positions = cache.extent(T)[0] if cache is not None and cache.on_device else \
                    torch.arange(start, start + T, device=x.device)
                rope_len = start + T if rope_len is None else rope_len  # known on the host: no sync
            q, k = self.rotary(q, k, positions, rope_len)
        kv_len = k_scale = v_scale = None
        if cache is not None:
            # keys/values of the whole prefix; an int8 cache's (KVCache.quantized) with their scales, the new
            # tokens' own too: both paths attend over what the cache holds
            k, v, k_scale, v_scale = cache.update(self.layer_idx, k, v)
            if cache.on_device:  # the whole buffers; the filled length on the device
                kv_len = cache.extent(T)[1]
        table = None if cache is None else cache.block_table  # a PagedKVCache's: k, v are its pools of pages
        if self.use_triton:
            from tritongpt.kernels.attention import flash_attention

            p = self.attn_drop.p if self.training else 0.0
            ctx = flash_attention(q, k, v, causal=True, softmax_scale=self.softmax_scale, dropout_p=p, doc_ids=doc_ids,
                                  window=self.window or None, softcap=self.softcap or None,
                                  alibi_slopes=self.alibi_slopes(q.device) if self.alibi else None, kv_len=kv_len,
                                  k_scale=k_scale, v_scale=v_scale, block_table=table,
                                  lengths_checked=cache is not None,  # (the cache's owner keeps its fill in range)
                                  sinks=self.sinks)
        else:
            if table is not None:  # each row's pages gathered into the rows a KVCache would hold
                k, v, k_scale, v_scale = (None if t is None else gather_pages(t, table)
                                          for t in (k, v, k_scale, v_scale))
            if k_scale is not None:  # the textbook core on the int8 cache's values read back in q's dtype
                k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
            ctx = self.attend(q, k, v, doc_ids, kv_len)
        ctx = ctx.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_drop(self.out_proj(ctx))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x)). Dropout lives in the sublayers.
    LN is GPTConfig.norm's: LayerNorm (GPT-2) or RMSNorm (Llama); both have add_and_norm.
    The MLP is GPT-2's (FeedForward) or Llama's or Gemma's (SwiGLUFeedForward, silu or GELU), as
    GPTConfig.mlp says; with GPTConfig.n_experts, experts of that gated MLP and a router (MoEFeedForward) in the
    layers GPTConfig.moe_layers names, the others that gated MLP at moe_dense_hidden.
    With GPTConfig.post_norms (Gemma 2, 3) each sublayer's output is normalized too, by a norm of its own,
    before it joins the residual: x + LN(attention(LN(x))); without
    GPTConfig.pre_norms (OLMo 2, 3) that outer norm is the only one: x + LN(attention(x)).
    With GPTConfig.parallel_residual (GPT-NeoX, Pythia) both sublayers read the same x:
    x + attention(LN1(x)) + MLP(LN2(x)) (parallel_forward); with GPTConfig.shared_norm too (Phi-1/1.5/2, GPT-J,
    Falcon-7B) through one norm, x + attention(LN1(x)) + MLP(LN1(x)), and the block has no norm2.
    With GPTConfig.residual_multiplier r != 1 (Granite's), each sublayer's output is multiplied by r before it
    joins the residual: x + r attention(LN(x)), then x + r MLP(LN(x)) (parallel: x + r (attention + MLP)).

    Each residual add is made by the LayerNorm that reads the sum (LayerNorm.add_and_norm): on
    the Triton path the add then shares that LayerNorm's pass over memory, as llm.c's fused
    residual forward does. So the block returns its MLP output beside x, not added to it, and
    the next LayerNorm (the next block's first, or the model's final one) adds it.
    """

    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        # OLMo 2's blocks have no input norms (pre_norms False): NoNorm still makes the residual adds
        self.norm1 = make_norm(cfg) if cfg.pre_norms else NoNorm()
        theta, scaling = cfg.layer_rope(layer_idx)  # Gemma 3's local layers have a RoPE of their own
        self.att = MultiHeadAttention(cfg.n_embd, cfg.n_head, cfg.context_length, cfg.dropout,
                                      cfg.bias, layer_idx, cfg.layer_window(layer_idx), cfg.scale_attention,
                                      cfg.has_qkv_bias, theta if cfg.layer_has_rope(layer_idx) else None,
                                      cfg.kv_heads, cfg.attention_head_dim,
                                      qk_norm_factory(cfg) if cfg.qk_norm else None, scaling,
                                      scale_width=cfg.attention_scale_width,
                                      softcap=cfg.attn_softcap, qk_norm_all=cfg.qk_norm_width == "all",
                                      rotary_dim=cfg.rotary_dim,
                                      alibi=cfg.position_encoding == "alibi",
                                      alibi_scale=1 / math.sqrt(cfg.head_dim) if cfg.alibi_scaled else 1.0,
                                      qk_norm_each=cfg.qk_norm_width == "each",
                                      multiplier=cfg.attention_multiplier, sinks=cfg.attention_sinks)
        # shared_norm (Phi-1/1.5/2, GPT-J, Falcon-7B): the MLP reads norm1's output too, and there is no norm2
        self.norm2 = None if cfg.shared_norm else make_norm(cfg) if cfg.pre_norms else NoNorm()
        # the sandwich's outer norms (Gemma's post_attention_layernorm and post_feedforward_layernorm)
        self.post_att_norm = make_norm(cfg) if cfg.post_norms else None
        self.post_ff_norm = make_norm(cfg) if cfg.post_norms else None
        if cfg.is_moe_layer(layer_idx):
            act = "gpt_oss" if cfg.moe_activation == "gpt_oss" else "gelu" if cfg.mlp == "geglu" else "silu"
            self.ff = MoEFeedForward(cfg.n_embd, cfg.ff_hidden, cfg.n_experts, cfg.experts_per_token, cfg.moe_norm_topk,
                                     cfg.dropout, act, cfg.moe_shared_hidden, cfg.moe_bias, cfg.swiglu_limit,
                                     cfg.swiglu_alpha)
        elif cfg.mlp in ("swiglu", "geglu"):
            # a dense layer among mixture-of-experts ones (moe_layers) has a width of its own (Qwen2-MoE's
            # intermediate_size beside its experts' moe_intermediate_size)
            hidden = cfg.moe_dense_hidden if cfg.n_experts else cfg.ff_hidden
            self.ff = SwiGLUFeedForward(cfg.n_embd, hidden, cfg.dropout, cfg.bias,
                                        "gelu" if cfg.mlp == "geglu" else "silu")
        else:  # "gelu" or "relu2": two matrices, the activation between them
            self.ff = FeedForward(cfg.n_embd, cfg.dropout, cfg.bias, cfg.gelu_approximate, cfg.ff_hidden,
                                  "relu2" if cfg.mlp == "relu2" else "gelu")
        self.parallel = cfg.parallel_residual
        # Granite's residual_multiplier: each sublayer's output times it before it joins the residual stream
        self.residual_multiplier = cfg.residual_multiplier

    def _scaled(self, out):
        """A sublayer's output as it joins the residual stream: times residual_multiplier (Granite's) when set. A
        torch product on either kernel path, before the (fused, on the Triton path) add-and-norm that adds it."""
        return out * self.residual_multiplier if self.residual_multiplier != 1.0 else out

    def forward(self, x, cache=None, doc_ids=None, mlp_out=None, positions=None, rope_len=None):
        """x: the residual stream; mlp_out: the previous block's MLP output, not yet added (None
        for the first block); positions: the tokens' positions, for RoPE. -> (x, this block's MLP
        output): the block's output is their sum. rope_len: LongRoPE's length, once per model forward."""
        if self.parallel:
            return self.parallel_forward(x, cache, doc_ids, mlp_out, positions, rope_len)
        if mlp_out is None:
            h = self.norm1(x)
        else:
            x, h = self.norm1.add_and_norm(x, mlp_out)  # x + mlp_out, and the LayerNorm of it
        att_out = self.att(h, cache, doc_ids, positions, rope_len)
        if self.post_att_norm is not None:
            att_out = self.post_att_norm(att_out)
        x, h = self.norm2.add_and_norm(x, self._scaled(att_out))
        ff_out = self.ff(h)
        return x, self._scaled(ff_out if self.post_ff_norm is None else self.post_ff_norm(ff_out))

    def parallel_forward(self, x, cache=None, doc_ids=None, mlp_out=None, positions=None, rope_len=None):
        """GPT-NeoX's parallel block: attention and MLP read the same x through their own norms, and
        their outputs go back together, x + attention(LN1(x)) + MLP(LN2(x)): the sum is handed on for
        the next norm's fused add, as forward hands on the MLP output alone. Without norm2 (shared_norm:
        Phi-1/1.5/2, GPT-J, Falcon-7B) both read LN1(x): x + attention(LN1(x)) + MLP(LN1(x))."""
        if mlp_out is None:
            h = self.norm1(x)
        else:
            x, h = self.norm1.add_and_norm(x, mlp_out)
        att_out = self.att(h, cache, doc_ids, positions, rope_len)
        ff_out = self.ff(h if self.norm2 is None else self.norm2(x))  # norm2 reads x itself, not x + att_out
        return x, self._scaled(att_out + ff_out)
