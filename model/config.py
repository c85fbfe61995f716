"""Model configurations: the GPT-2 and GPT-Neo families by name, plus small presets that train on a CPU."""
import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from tritongpt._types import is_int, is_real, softcap_value
from tritongpt.errors import UserError


WINDOW_LAYERS = ("all", "odd")  # which layers GPTConfig.attention_window makes local (or a list of them)
POSITION_ENCODINGS = ("learned", "rope", "alibi")  # GPTConfig.position_encoding
NORMS = ("layernorm", "rmsnorm")  # GPTConfig.norm
MLPS = ("gelu", "swiglu", "geglu", "relu2")  # GPTConfig.mlp
GATED_MLPS = ("swiglu", "geglu")  # three matrices, w_down(act(w_gate x) * w_up x)
QK_NORM_WIDTHS = ("head", "all", "each")  # GPTConfig.qk_norm_width
GELU_APPROXIMATES = ("tanh", "none")  # GPTConfig.gelu_approximate, as F.gelu(approximate=...) names them


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    # Grouped-query attention (Llama 2/3, Mistral; 1: multi-query): the keys and values have
    # n_kv_head heads, each shared by n_head / n_kv_head query heads, so W_key, W_value and the KV
    # cache shrink by that factor. 0: as many as n_head (GPT-2).
    n_kv_head: int = 0
    # Each head's width: 0, n_embd / n_head (GPT-2, Llama); or its own (Qwen3-0.6B: 16 heads of 128
    # over n_embd 1024), the queries, keys and values then n_head * attention_head_dim wide.
    attention_head_dim: int = 0
    # Qwen3's (and Gemma 3's) q/k norm: each head's query and key normalized (GPTConfig.norm,
    # over head_dim, weights of their own) before RoPE, which keeps the attention logits in range.
    # OLMo 2's and 3's normalize the whole q and k instead: qk_norm_width "all".
    qk_norm: bool = False
    dropout: float = 0.0
    bias: bool = True          # biases in Linear layers (GPT-2 has them)
    # GPT-Neo's attention differs from GPT-2's in two ways: its scores are q.k, not q.k / sqrt(head_dim)
    # (scale_attention False), and its query, key and value projections have no bias (qkv_bias False;
    # the output projection and the MLP keep theirs, as `bias` says). Qwen2's attention is the other
    # way round: biases on the query, key and value projections and nowhere else (bias False,
    # qkv_bias_only True). Which projections have one: has_qkv_bias, and `bias` for the rest.
    scale_attention: bool = True
    # The scores' scale is 1/sqrt(attention_scale_width): 0 is head_dim's (GPT-2, Llama). Gemma 2 27B and
    # Gemma 3 27B scale by another width (their query_pre_attn_scalar: 144 and 168, over heads of 128).
    attention_scale_width: int = 0
    # Attention logit soft-capping (Gemma 2, Grok): each scaled score s becomes c * tanh(s / c) before
    # the masks and the softmax (Gemma 2's attn_logit_softcapping, 50). 0: none.
    attn_softcap: float = 0.0
    qkv_bias: bool = True
    qkv_bias_only: bool = False
    # Attention sinks (gpt-oss): each attention block has a learned logit per query head, att.sinks [n_head], that
    # joins every query row's softmax as one more column with no value and is dropped after it, so a head can give
    # a row's weight to nothing rather than force it onto some token (its rows sum to less than 1). False: none.
    attention_sinks: bool = False
    tie_weights: bool = True   # LM head shares the token-embedding matrix (GPT-2 does)
    # Embedding and LM-head rows are padded to a multiple of this (64: GPT-2's 50257 -> 50304, as
    # nanoGPT and llm.c do) so the head's matmuls run on aligned shapes. The padding rows are
    # never a token: logits stop at vocab_size, and the loss and sampling never see them.
    vocab_multiple: int = 1
    # Logit soft-capping (Gemma 2, modded-nanogpt): the LM head's logits become c * tanh(logits / c),
    # bounded by c, in the loss and in sampling alike. 0: none (GPT-2 has none).
    logit_softcap: float = 0.0
    # Scaled logits (Cohere's Command R: 0.0625): the LM head's logits times logit_scale, before a soft cap. The
    # model multiplies the head's input by it, (s h) W^T = s (h W^T): one [tokens, C] product, the same in every
    # logits and loss path. 1: none.
    logit_scale: float = 1.0
    # IBM Granite's muP multipliers (GraniteForCausalLM, GraniteMoeForCausalLM; muP-style training too):
    # embedding_multiplier times the token embeddings (Granite 3's 12.0); residual_multiplier times each block's
    # attention and MLP outputs before they join the residual stream (0.22); attention_multiplier the attention
    # scores' scale itself, replacing 1/sqrt(head_dim) (0.015625; 0: the default scale). Granite's logits_scaling
    # divides the logits: logit_scale is its inverse. 1, 1, 0: none.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 0.0
    # Local attention (GPT-3's "locally banded" layers, GPT-Neo's local ones, Mistral's sliding
    # window): in a local layer a token attends to the last attention_window positions only,
    # itself included. 0: every layer sees the whole context (GPT-2). window_layers picks the
    # local layers: "all", "odd" (layers 1, 3, 5, ...: GPT-Neo's alternation with global layers),
    # or a comma list of layer indices ("0,1,2,3,4,6,...": Gemma 3's five local layers to a global one).
    attention_window: int = 0
    window_layers: str = "all"
    # Position encoding: "learned" absolute embeddings added to the tokens' (GPT-2's pos_emb), or
    # "rope", rotary embeddings of each head's queries and keys (GPT-NeoX, Llama, modded-nanogpt):
    # no pos_emb parameter then, and rope_theta is the base of the rotation frequencies. Or "alibi"
    # (BLOOM, MPT): no position parameters nor rotation, each head's scores get a linear bias
    # -m_h (i - j) by distance, m_h from layers.alibi_slopes (the RoPE fields are refused then).
    position_encoding: str = "learned"
    rope_theta: float = 10000.0
    # Falcon-RW's ALiBi: the bias added to the scores before their 1/sqrt(head_dim) scale, so the slopes are
    # divided by sqrt(head_dim) (True); False: BLOOM's and MPT's, added to the scaled scores.
    alibi_scaled: bool = False
    # RoPE's frequencies rescaled for a longer context than pretraining's (layers.scaled_inv_freq):
    # None, {"rope_type": "linear", "factor": f} (every frequency / f), Llama 3.1's and 3.2's
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or YaRN's (OLMo 3, Qwen3's long context) {"rope_type": "yarn",
    # "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"} (plus
    # "truncate": False where the correction range's bounds are not rounded out, GPT-OSS's), or
    # LongRoPE's (Phi-3, Phi-4-mini) {"rope_type": "longrope", "short_factor": [R/2 numbers], "long_factor":
    # [R/2], "original_max_position_embeddings", "factor", "attention_factor"} (long_factor over a forward
    # longer than the original context), as Hugging Face's rope_parameters spell them.
    rope_scaling: dict | None = None
    # Gemma 3's two RoPEs: the local (windowed) layers rotate with this base, unscaled, and the global
    # ones with rope_theta and rope_scaling (10000 and 1e6 in Gemma 3). 0: every layer as rope_theta says.
    rope_local_theta: float = 0.0
    # NoPE layers (SmolLM3's every fourth): a comma list of the layers whose q and k are not rotated,
    # attention there seeing no position but the causal mask's order. "": RoPE in every layer.
    nope_layers: str = ""
    # Partial rotary (GPT-NeoX/Pythia's rotary_pct, Phi's partial_rotary_factor, StableLM): only the first
    # rotary_dim dimensions of each head are rotated, pairs i and i + rotary_dim/2 at frequencies over
    # rotary_dim, and the rest pass through unchanged. 0: the whole head.
    rotary_dim: int = 0
    # Every norm of the model (each block's two and the final one): "layernorm", GPT-2's
    # (x - mean) / std * weight + bias, or "rmsnorm", x / rms(x) * weight (Llama, Gemma, modded-nanogpt:
    # no mean subtracted, no bias parameter). norm_eps is added to the variance or the mean square:
    # 1e-5 is GPT-2's and Llama 2's and 3's (a Llama's config.json may say 1e-6).
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    # The MLP: "gelu", GPT-2's Linear(C -> 4C), GELU, Linear(4C -> C); or "swiglu", Llama's
    # w_down(silu(w_gate x) * w_up x) with three matrices of hidden size mlp_hidden (0: Llama's
    # rule, 2/3 of 4C rounded up to a multiple of 64, about GPT-2's parameter count: 2048 at C = 768).
    # "geglu" is Gemma's: SwiGLU's three matrices with GELU (tanh) for silu. "relu2": GPT-2's two matrices with
    # the squared ReLU relu(h)^2 for the GELU (Arcee's AFM, Nemotron, modded-nanoGPT), hidden size mlp_hidden
    # (0: 4 n_embd).
    mlp: str = "gelu"
    mlp_hidden: int = 0
    # Gemma's two touches (Gemma 1, 2, 3): scale_embeddings multiplies the token embeddings by
    # sqrt(n_embd) (rounded to their dtype, as Gemma does) before the first block; post_norms
    # (Gemma 2, 3: "sandwich" norms) normalizes each sublayer's output before it joins the residual,
    # x + norm(attention(norm(x))), with a norm of its own. Gemma's RMSNorm multiplies by (1 + w):
    # its weights are read in as 1 + w and written out as w - 1, the same function (train/gemma_weights.py).
    scale_embeddings: bool = False
    post_norms: bool = False
    # OLMo 2's and 3's blocks normalize after each sublayer only (post_norms without the input norms):
    # x + norm(attention(x)), then x + norm(mlp(x)). pre_norms False: norm1 and norm2 are identities
    # (layers.NoNorm, no weights); the final norm stays.
    pre_norms: bool = True
    # What qk_norm normalizes over: "head", each head's q and k over head_dim (Qwen3, Gemma 3), or
    # "all", the whole projection before it splits into heads, n_head * head_dim wide for q and
    # n_kv_head * head_dim for k (OLMo 2 and 3: one weight over every head), or "each", over head_dim as
    # "head" but with a weight of each head's own, [n_head, head_dim] for q and [n_kv_head, head_dim] for k
    # (StableLM 2 12B, Command R+). "each" norms never have a bias, whatever norm_bias says: neither family's has.
    qk_norm_width: str = "head"
    # GPT-NeoX's (Pythia's, GPT-J's) parallel block: attention and MLP both read the block's input x, each
    # through its own norm, x + attention(norm1(x)) + mlp(norm2(x)), one residual add where GPT-2 has two.
    parallel_residual: bool = False
    # The GELU MLP's GELU: "tanh", GPT-2's approximation (gelu_new), or "none", the exact x Phi(x) with erf
    # (GPT-NeoX's and Pythia's "gelu"), as torch's F.gelu(approximate=...) names them.
    gelu_approximate: str = "tanh"
    # Phi-1/1.5/2's (GPT-J's, Falcon-7B's) parallel block has one norm: h = norm1(x), x + attention(h) + mlp(h).
    # Valid with parallel_residual only; the block then has no norm2 (no norm2.* weights).
    shared_norm: bool = False
    # A bias on the LM head (Phi-1/1.5/2's lm_head.bias, GPT-J's), added to every logit; tied weights keep it
    # as a parameter of its own. The padding rows' entries (vocab_multiple) are zero and never trained.
    head_bias: bool = False
    # BLOOM's word_embeddings_layernorm: a norm (GPTConfig.norm, weights of its own) applied to the token
    # embeddings before the first block.
    embed_norm: bool = False
    # Whether the LayerNorms have biases: MPT's have none (its LayerNorms' bias is None). Only LayerNorm has one:
    # with norm "rmsnorm" it stays True.
    norm_bias: bool = True
    # Mixture of experts (Mixtral, Qwen3-MoE, OLMoE): each block's MLP is n_experts gated MLPs (mlp "swiglu" or
    # "geglu", hidden size mlp_hidden each) and a router; every token goes through its experts_per_token
    # highest-scoring experts, their outputs summed with the router's softmax weights, renormalized over the
    # chosen k when moe_norm_topk (Mixtral's; Qwen3-MoE's norm_topk_prob; OLMoE's is False). moe_aux_loss: the
    # coefficient of the router's load-balancing loss (Switch Transformer's, transformers'
    # load_balancing_loss_func) added to the training loss; 0: none. n_experts 0: a dense MLP.
    n_experts: int = 0
    experts_per_token: int = 2
    moe_norm_topk: bool = True
    moe_aux_loss: float = 0.0
    # Qwen2-MoE's shared expert: beside its routed top k, every token goes through one more gated MLP (the same
    # mlp, no biases) of hidden size moe_shared_hidden (shared_expert_intermediate_size), its output scaled by
    # sigmoid(x w_g), w_g a [1, n_embd] gate of its own, and added to the routed sum. 0: none (Mixtral, Qwen3-MoE,
    # OLMoE). Always gated: DeepSeek's ungated shared experts are another function, not read.
    moe_shared_hidden: int = 0
    # Which layers' MLPs are the mixture (a layer set as window_layers: "all", "odd" or a comma list); the others
    # are a dense gated MLP (mlp's, biases as bias says) of hidden size moe_dense_hidden, which they then need (0:
    # unset). Qwen2-MoE's and Qwen3-MoE's mlp_only_layers and decoder_sparse_step (a layer is sparse when it is not
    # in mlp_only_layers and (i + 1) % decoder_sparse_step == 0; the dense ones' width intermediate_size), and
    # DeepSeek's first_k_dense_replace k as the list k, k+1, ..., n_layer-1. "all": every layer (Mixtral, OLMoE).
    moe_layers: str = "all"
    moe_dense_hidden: int = 0
    # GPT-OSS's experts: moe_bias gives the router and each expert's gate, up and down products biases
    # (ff.router.bias, ff.b_gate, ff.b_up [E, mlp_hidden], ff.b_down [E, n_embd]); moe_activation "gpt_oss" makes
    # the experts' SwiGLU its clamped one, gate g = min(g, swiglu_limit), up u = clamp(u, +-swiglu_limit),
    # (u + 1) * g * sigmoid(swiglu_alpha * g), where "glu" is the gated MLP that mlp names. The Triton MoE kernel
    # (kernels/moe.py) computes both, forward and backward.
    moe_bias: bool = False
    moe_activation: str = "glu"
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    kernels: str = "reference"  # "reference" | "triton" | "auto" | a comma list of toggle.KERNEL_NAMES
    # LoRA (model/lora.py): rank 0 is none; else the targets' weights are W + (alpha / rank) B A
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "attn,mlp"

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head", "vocab_multiple"):
            value = getattr(self, name)
            # numpy integers are integers (stored as int: the config is saved as JSON); bools are not
            if not is_int(value) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if not is_int(self.attention_head_dim) or self.attention_head_dim < 0:
            raise UserError(f"GPTConfig.attention_head_dim must be an integer >= 0 (0: n_embd / n_head), "
                            f"got {self.attention_head_dim!r}")
        self.attention_head_dim = int(self.attention_head_dim)
        if self.n_embd % self.n_head and not self.attention_head_dim:
            raise UserError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not is_int(self.n_kv_head) or self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise UserError(f"GPTConfig.n_kv_head must divide n_head={self.n_head} (0: as many as n_head), "
                            f"got {self.n_kv_head!r}")
        self.n_kv_head = int(self.n_kv_head)
        if not is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        try:
            self.logit_softcap = softcap_value(self.logit_softcap, "GPTConfig.logit_softcap")
        except ValueError as e:
            raise UserError(str(e)) from None
        try:
            self.attn_softcap = softcap_value(self.attn_softcap, "GPTConfig.attn_softcap")
        except ValueError as e:
            raise UserError(str(e)) from None
        if not is_real(self.logit_scale) or not math.isfinite(self.logit_scale) or self.logit_scale <= 0:
            raise UserError(f"GPTConfig.logit_scale must be a finite number > 0 (1: unscaled logits), "
                            f"got {self.logit_scale!r}")
        self.logit_scale = float(self.logit_scale)
        if self.logit_scale != 1.0 and self.head_bias:
            # scaling the head's input would scale h W^T but not the bias; no family has both
            raise UserError(f"GPTConfig.logit_scale {self.logit_scale:g} with head_bias: the scale is applied to the "
                            "LM head's input, which would leave the bias unscaled; set one of them only")
        if not is_int(self.attention_scale_width) or self.attention_scale_width < 0:
            raise UserError(f"GPTConfig.attention_scale_width must be an integer >= 0 (0: head_dim), "
                            f"got {self.attention_scale_width!r}")
        self.attention_scale_width = int(self.attention_scale_width)
        self._check_multipliers()
        if not is_int(self.attention_window) or self.attention_window < 0:
            raise UserError(f"GPTConfig.attention_window must be an integer >= 0 (0: no local attention), "
                            f"got {self.attention_window!r}")
        self.attention_window = int(self.attention_window)
        self.window_layers = check_window_layers(self.window_layers, self.n_layer)
        if self.position_encoding not in POSITION_ENCODINGS:
            raise UserError(f"GPTConfig.position_encoding must be one of {', '.join(POSITION_ENCODINGS)}, "
                            f"got {self.position_encoding!r}")
        if self.norm not in NORMS:
            raise UserError(f"GPTConfig.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if not is_real(self.norm_eps) or not math.isfinite(self.norm_eps) or not 0 < self.norm_eps < 1:
            raise UserError(f"GPTConfig.norm_eps must be a number in (0, 1), got {self.norm_eps!r}")
        self.norm_eps = float(self.norm_eps)
        if not is_real(self.rope_theta) or not math.isfinite(self.rope_theta) or self.rope_theta <= 0:
            raise UserError(f"GPTConfig.rope_theta must be a finite number > 0 (the base of RoPE's frequencies), "
                            f"got {self.rope_theta!r}")
        self.rope_theta = float(self.rope_theta)
        self.rope_scaling = check_rope_scaling(self.rope_scaling, "GPTConfig.rope_scaling")
        if not is_real(self.rope_local_theta) or not math.isfinite(self.rope_local_theta) or self.rope_local_theta < 0:
            raise UserError(f"GPTConfig.rope_local_theta must be a finite number >= 0 (0: rope_theta in every layer), "
                            f"got {self.rope_local_theta!r}")
        self.rope_local_theta = float(self.rope_local_theta)
        if self.rope_local_theta and (self.position_encoding != "rope" or not self.attention_window):
            raise UserError(f"GPTConfig.rope_local_theta {self.rope_local_theta:g} is the RoPE base of the local "
                            f"layers; this model has " + ("no local attention (attention_window 0)"
                                                          if self.position_encoding == "rope" else
                                                          f"position_encoding {self.position_encoding!r}")
                            + ": leave it 0")
        if self.nope_layers != "":
            if self.position_encoding != "rope":
                raise UserError(f"GPTConfig.nope_layers {self.nope_layers!r} names layers without RoPE; this model "
                                f"has position_encoding {self.position_encoding!r}: set it to 'rope' or leave "
                                "nope_layers empty")
            self.nope_layers = check_window_layers(self.nope_layers, self.n_layer, "GPTConfig.nope_layers")
        if self.rope_scaling and self.position_encoding != "rope":
            raise UserError(f"GPTConfig.rope_scaling stretches RoPE's frequencies; this model has position_encoding "
                            f"{self.position_encoding!r}: set it to 'rope' or leave rope_scaling None")
        if self.position_encoding == "rope" and self.head_dim % 2 and not self.rotary_dim:
            raise UserError(f"RoPE rotates pairs of dimensions: head_dim {self.head_dim} (n_embd {self.n_embd} / "
                            f"n_head {self.n_head}) must be even")
        self._check_partial_rotary()
        if self.mlp not in MLPS:
            raise UserError(f"GPTConfig.mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if not is_int(self.mlp_hidden) or self.mlp_hidden < 0:
            raise UserError(f"GPTConfig.mlp_hidden must be an integer >= 0 (0: Llama's rule), got {self.mlp_hidden!r}")
        self.mlp_hidden = int(self.mlp_hidden)
        if self.mlp_hidden and self.mlp not in GATED_MLPS + ("relu2",):
            raise UserError(f"GPTConfig.mlp_hidden {self.mlp_hidden} is the gated (SwiGLU, GeGLU) or squared-ReLU "
                            f"MLP's hidden size; the GELU MLP's is 4 n_embd: set mlp 'swiglu', 'geglu' or 'relu2', "
                            "or leave mlp_hidden 0")
        for name in ("bias", "tie_weights", "scale_attention", "qkv_bias", "qkv_bias_only", "qk_norm",
                     "scale_embeddings", "post_norms", "attention_sinks"):
            value = getattr(self, name)
            # a bool or numpy's; not a string ("False" would read as true) or a number
            if not isinstance(value, (bool, np.bool_)):
                raise UserError(f"GPTConfig.{name} must be True or False, got {value!r}")
            setattr(self, name, bool(value))
        if self.attention_scale_width and not self.scale_attention:
            raise UserError(f"GPTConfig.attention_scale_width {self.attention_scale_width} sets the scale of the "
                            "attention scores, which scale_attention False leaves unscaled: set one of them")
        if self.attention_multiplier and not self.scale_attention:
            raise UserError(f"GPTConfig.attention_multiplier {self.attention_multiplier:g} is the attention scores' "
                            "scale, which scale_attention False leaves unscaled: set scale_attention True or leave "
                            "attention_multiplier 0")
        if self.qkv_bias_only and self.bias:
            raise UserError("GPTConfig.qkv_bias_only gives the query, key and value projections biases in a model "
                            "without others (Qwen2's); with bias True they have them already (qkv_bias): set bias "
                            "False or qkv_bias_only False")
        self._check_olmo_fields()
        self._check_neox_fields()
        self._check_moe_fields()
        from tritongpt.model.lora import check_lora
        from tritongpt.model.toggle import resolve_kernels

        check_lora(self.lora_rank, self.lora_alpha, self.lora_targets)
        self.lora_rank, self.lora_alpha = int(self.lora_rank), float(self.lora_alpha)

        resolve_kernels(self.kernels, "cpu", check_device=False)  # the names only: a typo now, not later

    def _check_multipliers(self):
        """Granite's embedding_multiplier, residual_multiplier and attention_multiplier: finite numbers > 0 (the
        attention's >= 0, 0 meaning 1/sqrt(head_dim)), and the attention's scale set once."""
        for name in ("embedding_multiplier", "residual_multiplier"):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a finite number > 0 (1: none), got {value!r}")
            setattr(self, name, float(value))
        m = self.attention_multiplier
        if not is_real(m) or not math.isfinite(m) or m < 0:
            raise UserError(f"GPTConfig.attention_multiplier must be a finite number > 0, the attention scores' scale "
                            f"(0: 1/sqrt(head_dim)), got {m!r}")
        self.attention_multiplier = float(m)
        if m and self.attention_scale_width:
            raise UserError(f"GPTConfig.attention_multiplier {m:g} is the attention scores' scale, and "
                            f"attention_scale_width {self.attention_scale_width} sets it too: set one of them")

    def _check_partial_rotary(self):
        """rotary_dim, and LongRoPE's factor lists against the pairs it rotates (its defaults filled in)."""
        if not is_int(self.rotary_dim) or self.rotary_dim < 0:
            raise UserError(f"GPTConfig.rotary_dim must be an integer >= 0 (0: the whole head), "
                            f"got {self.rotary_dim!r}")
        self.rotary_dim = int(self.rotary_dim)
        if self.rotary_dim and self.position_encoding != "rope":
            raise UserError(f"GPTConfig.rotary_dim {self.rotary_dim} is how much of a head RoPE rotates; this model "
                            f"has position_encoding {self.position_encoding!r}: set it to 'rope' or leave rotary_dim 0")
        if self.rotary_dim and (self.rotary_dim % 2 or not 2 <= self.rotary_dim <= self.head_dim):
            raise UserError(f"GPTConfig.rotary_dim {self.rotary_dim} must be even (pairs i, i + rotary_dim/2) and "
                            f"in [2, head_dim {self.head_dim}] (0: the whole head)")
        if self.rope_scaling and self.rope_scaling["rope_type"] == "longrope":
            self.rope_scaling = longrope_defaults(self.rope_scaling, "GPTConfig.rope_scaling", self.context_length,
                                                  (self.rotary_dim or self.head_dim) // 2)

    def _check_olmo_fields(self):
        """pre_norms and qk_norm_width (OLMo 2, 3): checked by name, as the other fields."""
        if not isinstance(self.pre_norms, (bool, np.bool_)):
            raise UserError(f"GPTConfig.pre_norms must be True or False, got {self.pre_norms!r}")
        self.pre_norms = bool(self.pre_norms)
        if not self.pre_norms and not self.post_norms:  # no norm left in the blocks: the residual would grow unchecked
            raise UserError("GPTConfig.pre_norms False leaves a block's sublayers without a norm unless post_norms "
                            "is True (OLMo 2's blocks normalize each sublayer's output): set post_norms True or "
                            "pre_norms True")
        if self.qk_norm_width not in QK_NORM_WIDTHS:
            raise UserError(f"GPTConfig.qk_norm_width must be one of {', '.join(QK_NORM_WIDTHS)}, "
                            f"got {self.qk_norm_width!r}")
        if self.qk_norm_width != "head" and not self.qk_norm:
            raise UserError(f"GPTConfig.qk_norm_width {self.qk_norm_width!r} says how q and k are normalized, and "
                            "qk_norm is False: set qk_norm True or leave qk_norm_width 'head'")

    def _check_neox_fields(self):
        """parallel_residual and gelu_approximate (GPT-NeoX, Pythia), shared_norm and head_bias (Phi-1/1.5/2, GPT-J),
        embed_norm (BLOOM), norm_bias (MPT) and alibi_scaled (Falcon-RW): checked by name."""
        if not isinstance(self.parallel_residual, (bool, np.bool_)):
            raise UserError(f"GPTConfig.parallel_residual must be True or False, got {self.parallel_residual!r}")
        self.parallel_residual = bool(self.parallel_residual)
        if self.parallel_residual and (self.post_norms or not self.pre_norms):
            # no family has both: where the sandwich's outer norms or OLMo's lone ones would go is undefined
            raise UserError("GPTConfig.parallel_residual (GPT-NeoX's block: both sublayers read the block's input "
                            "through their own norm) is built with input norms only: set post_norms False and "
                            "pre_norms True, or parallel_residual False")
        for name in ("shared_norm", "head_bias", "embed_norm", "norm_bias", "alibi_scaled"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise UserError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        if self.shared_norm and not self.parallel_residual:
            raise UserError("GPTConfig.shared_norm (Phi's, GPT-J's and Falcon's block: attention and MLP read one "
                            "norm's output) is a parallel block's: set parallel_residual True or shared_norm False")
        if self.alibi_scaled and self.position_encoding != "alibi":
            raise UserError(f"GPTConfig.alibi_scaled scales ALiBi's slopes; this model has position_encoding "
                            f"{self.position_encoding!r}: set it to 'alibi' or leave alibi_scaled False")
        if not self.norm_bias and self.norm != "layernorm":
            raise UserError(f"GPTConfig.norm_bias False drops the LayerNorms' biases; this model's norm is "
                            f"{self.norm!r}, which has none: leave norm_bias True")
        if self.gelu_approximate not in GELU_APPROXIMATES:
            raise UserError(f"GPTConfig.gelu_approximate must be one of {', '.join(GELU_APPROXIMATES)}, "
                            f"got {self.gelu_approximate!r}")
        if self.gelu_approximate != "tanh" and self.mlp != "gelu":
            raise UserError(f"GPTConfig.gelu_approximate {self.gelu_approximate!r} picks the GELU MLP's GELU; this "
                            f"model's mlp is {self.mlp!r} (its gate keeps the tanh form): set mlp 'gelu' or leave "
                            "gelu_approximate 'tanh'")

    def _check_moe_fields(self):
        """n_experts, experts_per_token, moe_norm_topk, moe_aux_loss, moe_shared_hidden, moe_layers and
        moe_dense_hidden (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE): checked by name."""
        for name, low in (("n_experts", 0), ("experts_per_token", 1), ("moe_shared_hidden", 0),
                          ("moe_dense_hidden", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                raise UserError(f"GPTConfig.{name} must be an integer >= {low}, got {value!r}")
            setattr(self, name, int(value))
        if not isinstance(self.moe_norm_topk, (bool, np.bool_)):
            raise UserError(f"GPTConfig.moe_norm_topk must be True or False, got {self.moe_norm_topk!r}")
        self.moe_norm_topk = bool(self.moe_norm_topk)
        if not is_real(self.moe_aux_loss) or not math.isfinite(self.moe_aux_loss) or self.moe_aux_loss < 0:
            raise UserError(f"GPTConfig.moe_aux_loss must be a finite number >= 0 (0: no load-balancing loss), "
                            f"got {self.moe_aux_loss!r}")
        self.moe_aux_loss = float(self.moe_aux_loss)
        if not isinstance(self.moe_bias, (bool, np.bool_)):
            raise UserError(f"GPTConfig.moe_bias must be True or False, got {self.moe_bias!r}")
        self.moe_bias = bool(self.moe_bias)
        if self.moe_activation not in MOE_ACTIVATIONS:
            raise UserError(f"GPTConfig.moe_activation must be one of {', '.join(MOE_ACTIVATIONS)} ('glu': the gated "
                            f"MLP mlp names; 'gpt_oss': GPT-OSS's clamped SwiGLU), got {self.moe_activation!r}")
        for name, default in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702)):
            value = getattr(self, name)
            if not is_real(value) or not math.isfinite(value) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a finite number > 0 (GPT-OSS's clamped SwiGLU), "
                                f"got {value!r}")
            setattr(self, name, float(value))
            if value != default and self.moe_activation != "gpt_oss":  # said, and nothing would read it
                raise UserError(f"GPTConfig.{name} {value:g} sets GPT-OSS's clamped SwiGLU, and this model's "
                                f"moe_activation is {self.moe_activation!r}: set moe_activation 'gpt_oss' or leave "
                                f"{name} {default:g}")
        if not self.n_experts:
            if self.moe_aux_loss:
                raise UserError(f"GPTConfig.moe_aux_loss {self.moe_aux_loss:g} balances a router's load, and this "
                                "model has none (n_experts 0): set n_experts or leave moe_aux_loss 0")
            if self.moe_shared_hidden:
                raise UserError(f"GPTConfig.moe_shared_hidden {self.moe_shared_hidden} is the width of a shared "
                                "expert beside routed ones, and this model has none (n_experts 0): set n_experts or "
                                "leave moe_shared_hidden 0")
            if self.moe_bias or self.moe_activation != "glu":
                raise UserError(f"GPTConfig.moe_bias {self.moe_bias} and moe_activation {self.moe_activation!r} are "
                                "GPT-OSS's experts' biases and activation, and this model has no experts (n_experts "
                                "0): set n_experts or leave them False and 'glu'")
            if self.moe_layers != "all" or self.moe_dense_hidden:
                raise UserError(f"GPTConfig.moe_layers {self.moe_layers!r} and moe_dense_hidden "
                                f"{self.moe_dense_hidden} say which layers are a mixture of experts and the others' "
                                "width, and this model has no experts (n_experts 0): set n_experts or leave them "
                                "'all' and 0")
            return
        self.moe_layers = check_window_layers(self.moe_layers, self.n_layer, "GPTConfig.moe_layers")
        if self.moe_layers != "all":  # "odd" as its list: one spelling a set, as an export reads back
            self.moe_layers = ",".join(map(str, layer_list(self.moe_layers, self.n_layer)))
        if self.moe_layers != "all" and not self.moe_dense_hidden:
            raise UserError(f"GPTConfig.moe_layers {self.moe_layers!r} leaves layers "
                            f"{','.join(str(i) for i in range(self.n_layer) if not self.is_moe_layer(i))} a dense "
                            "MLP, whose hidden size moe_dense_hidden is missing (0): set moe_dense_hidden (Qwen2-MoE's "
                            "and Qwen3-MoE's intermediate_size)")
        if self.moe_layers == "all" and self.moe_dense_hidden:
            raise UserError(f"GPTConfig.moe_dense_hidden {self.moe_dense_hidden} is the width of the dense layers "
                            "among the mixture-of-experts ones, and moe_layers 'all' leaves none: set moe_layers or "
                            "leave moe_dense_hidden 0")
        if self.mlp not in GATED_MLPS:
            raise UserError(f"GPTConfig.n_experts {self.n_experts}: the experts are gated MLPs (mlp 'swiglu' or "
                            f"'geglu'), and this model's mlp is {self.mlp!r}: set mlp or leave n_experts 0")
        if self.moe_activation == "gpt_oss" and self.mlp != "swiglu":
            raise UserError(f"GPTConfig.moe_activation 'gpt_oss' is a clamped SwiGLU, and this model's mlp is "
                            f"{self.mlp!r}: set mlp 'swiglu'")
        if self.experts_per_token > self.n_experts:
            raise UserError(f"GPTConfig.experts_per_token {self.experts_per_token} is more than the n_experts "
                            f"{self.n_experts} there are")
        if self.lora_rank and "mlp" in [t.strip() for t in str(self.lora_targets).split(",")]:
            raise UserError("GPTConfig.lora_targets 'mlp' adapts the dense MLP's matrices, and this model's MLPs are "
                            f"{self.n_experts} experts (n_experts), which LoRA does not adapt: set lora_targets 'attn'")

    @property
    def head_dim(self) -> int:
        """Each attention head's width: attention_head_dim, or n_embd / n_head when it is 0."""
        return self.attention_head_dim or self.n_embd // self.n_head

    @property
    def has_qkv_bias(self) -> bool:
        """Whether the query, key and value projections have biases: GPT-2's and Qwen2's do,
        GPT-Neo's and Llama's do not."""
        return (self.bias and self.qkv_bias) or self.qkv_bias_only

    @property
    def ff_hidden(self) -> int:
        """The MLP's hidden size: 4 n_embd (GELU), mlp_hidden or 4 n_embd (squared ReLU), or mlp_hidden / Llama's
        rule (SwiGLU, GeGLU)."""
        if self.mlp == "gelu":
            return 4 * self.n_embd
        if self.mlp == "relu2":
            return self.mlp_hidden or 4 * self.n_embd
        from tritongpt.model.layers import swiglu_hidden

        return self.mlp_hidden or swiglu_hidden(self.n_embd)

    @property
    def kv_heads(self) -> int:
        """How many key/value heads each layer has: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    def layer_window(self, layer_idx: int) -> int:
        """The attention window of layer layer_idx: attention_window if it is a local layer, else 0."""
        return self.attention_window if layer_idx in self.local_layers else 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer layer_idx's MLP is the mixture of experts (n_experts, in moe_layers), not a dense MLP."""
        return bool(self.n_experts) and layer_idx in layer_list(self.moe_layers, self.n_layer)

    @property
    def moe_layer_count(self) -> int:
        """How many layers are a mixture of experts (0 for a dense model)."""
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))

    @property
    def local_layers(self) -> tuple:
        """The indices of the layers window_layers names ("all", "odd" or its list)."""
        return layer_list(self.window_layers, self.n_layer)

    def layer_has_rope(self, layer_idx: int) -> bool:
        """Whether layer layer_idx rotates q and k: RoPE models, except the nope_layers (SmolLM3's)."""
        if self.position_encoding != "rope" or self.nope_layers == "":
            return self.position_encoding == "rope"
        return layer_idx not in layer_list(self.nope_layers, self.n_layer)

    def positions_said(self) -> str:
        """What this model does with positions, as an export's refusal says it (\"this model ...\")."""
        if self.position_encoding == "alibi":
            scaled = ", added before the scores' scale: alibi_scaled, Falcon-RW's" if self.alibi_scaled else ""
            return f"biases each head's attention scores by distance (ALiBi, position_encoding alibi{scaled})"
        if self.position_encoding == "rope":
            return "rotates q and k by their positions (position_encoding rope)"
        return "learns position embeddings (position_encoding learned)"

    def layer_rope(self, layer_idx: int) -> tuple:
        """(RoPE's base, its scaling) in layer layer_idx: rope_local_theta unscaled in a local layer
        when it is set (Gemma 3), else rope_theta and rope_scaling."""
        if self.rope_local_theta and self.layer_window(layer_idx):
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: vocab_size rounded up to vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
        return cls(**d)


def layer_list(value: str, n_layer: int) -> tuple:
    """The indices a checked layer set names: "all", "odd" (1, 3, 5, ...) or a comma list."""
    if value == "all":
        return tuple(range(n_layer))
    if value == "odd":
        return tuple(range(1, n_layer, 2))
    return tuple(int(i) for i in value.split(","))


def check_window_layers(value, n_layer: int, where: str = "GPTConfig.window_layers") -> str:
    """A layer set (window_layers, nope_layers) checked: "all", "odd", or a comma list of distinct layer
    indices below n_layer, in increasing order (returned without spaces, a list that names every layer as
    "all")."""
    if value in WINDOW_LAYERS:
        return value
    parts = value.split(",") if isinstance(value, str) else []
    if not parts or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"{where} must be {', '.join(WINDOW_LAYERS)} or a comma list of layer indices "
                        f"(\"0,1,2,3,4,6\"), got {value!r}")
    layers = [int(p) for p in parts]
    if layers != sorted(set(layers)) or layers[-1] >= n_layer:
        raise UserError(f"{where} {value!r} must list distinct layers in increasing order, each below n_layer "
                        f"{n_layer}")
    return "all" if layers == list(range(n_layer)) else ",".join(map(str, layers))


def window_layers_arg(text: str) -> str:
    """--window-layers, spaces dropped ("0, 1" is "0,1"): all, odd or a comma list of numbers, refused at
    parsing otherwise; GPTConfig checks the list against n_layer."""
    import argparse

    text = text.replace(" ", "")
    if text not in WINDOW_LAYERS and not all(p.isdigit() for p in text.split(",")):
        raise argparse.ArgumentTypeError(f"all, odd or a comma list of layer indices (0,1,2,3,4,6), got {text!r}")
    return text


MOE_ACTIVATIONS = ("glu", "gpt_oss")
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                              "attention_factor"),
                     "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "factor",
                                  "attention_factor")}
LONGROPE_OPTIONAL = ("factor", "attention_factor")  # GPTConfig fills them in (longrope_defaults)
LONGROPE_LISTS = ("short_factor", "long_factor")


def check_rope_scaling(scaling, where: str) -> dict | None:
    """A RoPE scaling spec (GPTConfig.rope_scaling) checked and normalized: None, or a dict of its
    rope_type and that type's keys (ROPE_SCALING_KEYS), each a finite number > 0 (floats; the
    original context an int; longrope's two factor lists of them), llama3's high_freq_factor above its
    low one. longrope's factor and attention_factor may be left out (or null): longrope_defaults."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise UserError(f"{where} must be a dict (rope_type and its factors) or None, got {type(scaling).__name__}")
    kind = scaling.get("rope_type")
    truncate = True
    if kind == "yarn":
        scaling = yarn_defaults(scaling, where)
        truncate = scaling.pop("truncate", True)
    if kind not in ROPE_SCALING_KEYS:
        raise UserError(f"{where}: rope_type {kind!r} is not computed here; one of {', '.join(ROPE_SCALING_KEYS)}")
    keys = ROPE_SCALING_KEYS[kind]
    if kind == "longrope":  # absent and null are one (transformers' .get)
        scaling = {k: v for k, v in scaling.items() if not (k in LONGROPE_OPTIONAL and v is None)}
    unknown = sorted(set(scaling) - set(keys) - {"rope_type"})
    missing = [k for k in keys if k not in scaling and not (kind == "longrope" and k in LONGROPE_OPTIONAL)]
    if unknown or missing:
        raise UserError(f"{where}: {kind} scaling takes {', '.join(keys)}"
                        + (f"; missing {', '.join(missing)}" if missing else "")
                        + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    out = {"rope_type": kind}
    for k in keys:
        if k not in scaling:
            continue
        v = scaling[k]
        if k in LONGROPE_LISTS:
            out[k] = factor_list(v, f"{where}: {k}")
            continue
        if not is_real(v) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{where}: {k} must be a finite number > 0, got {v!r}")
        out[k] = int(v) if k == "original_max_position_embeddings" else float(v)
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise UserError(f"{where}: high_freq_factor {out['high_freq_factor']:g} must be above low_freq_factor "
                        f"{out['low_freq_factor']:g}")
    if kind == "longrope" and len(out["short_factor"]) != len(out["long_factor"]):
        raise UserError(f"{where}: short_factor has {len(out['short_factor'])} numbers and long_factor "
                        f"{len(out['long_factor'])}: one for each rotated pair, both")
    if not truncate:  # kept only when false, so the common spec (truncate true) compares as before
        out["truncate"] = False
    return out


def factor_list(value, where: str) -> list:
    """LongRoPE's short_factor or long_factor: a non-empty list of finite numbers > 0, as floats."""
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(f"{where} must be a non-empty list of numbers (one per rotated pair), got {value!r}")
    for i, v in enumerate(value):
        if not is_real(v) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{where}[{i}] must be a finite number > 0, got {v!r}")
    return [float(v) for v in value]


def longrope_defaults(scaling: dict, where: str, context_length: int, n_pairs: int) -> dict:
    """A checked LongRoPE spec with transformers' defaults (_compute_longrope_parameters): factor the context
    over the original one, attention_factor sqrt(1 + ln factor / ln original) (1 for a factor <= 1); its
    lists checked against the n_pairs pairs RoPE rotates (rotary_dim / 2, or head_dim / 2)."""
    n = len(scaling["short_factor"])
    if n != n_pairs:
        raise UserError(f"{where}: short_factor and long_factor have {n} numbers, and RoPE rotates {n_pairs} pairs "
                        f"of each head (rotary_dim / 2, or head_dim / 2): one factor for each pair")
    out = dict(scaling)
    original = out["original_max_position_embeddings"]
    out.setdefault("factor", context_length / original)
    if "attention_factor" not in out:
        if out["factor"] > 1 and original < 2:
            raise UserError(f"{where}: original_max_position_embeddings {original} gives no attention_factor "
                            "(ln 1 = 0 in its default): set attention_factor")
        out["attention_factor"] = (math.sqrt(1 + math.log(out["factor"]) / math.log(original))
                                   if out["factor"] > 1 else 1.0)
    return out


def yarn_defaults(scaling: dict, where: str) -> dict:
    """A YaRN spec with transformers' defaults where it leaves them out (_compute_yarn_parameters): beta_fast
    32, beta_slow 1, attention_factor 0.1 ln(factor) + 1 (1 for a factor <= 1), truncate true when absent
    (a null truncate is false there: transformers tests it with `if truncate`). DeepSeek's mscale keys, which this
    model does not compute, are refused by name."""
    check_rope_extras(scaling, "yarn", where)
    out = dict(scaling)
    truncate = out.pop("truncate", True)
    if truncate is not None and not isinstance(truncate, (bool, np.bool_)):
        raise UserError(f"{where}: YaRN's truncate must be true or false (whether the correction range's bounds are "
                        f"rounded out), got {truncate!r}")
    out["truncate"] = bool(truncate)
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if out.get(key) is None:  # transformers' `or`: absent or null
            out[key] = default
    factor = out.get("factor")
    if out.get("attention_factor") is None and "factor" in out:
        # (a factor that is no number leaves no default to compute: said of the factor, not as a missing
        # attention_factor the file never had to give)
        if not is_real(factor) or not math.isfinite(factor) or factor <= 0:
            raise UserError(f"{where}: factor must be a finite number > 0, got {factor!r}")
        out["attention_factor"] = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return out


def check_rope_extras(params: dict, kind: str, where: str) -> None:
    """The keys of a config.json's RoPE scaling that GPTConfig.rope_scaling leaves out but that would change
    the function: YaRN's mscale and mscale_all_dim (DeepSeek's attention factor)."""
    if kind != "yarn":
        return
    extra = [k for k in ("mscale", "mscale_all_dim") if params.get(k)]
    if extra:
        raise UserError(f"{where}: YaRN with {', '.join(extra)} (DeepSeek's attention factor) is not computed here; "
                        "attention_factor, or the default 0.1 ln(factor) + 1, is")


PRESETS = {
    # The published GPT-2 sizes (124M / 355M / 774M / 1558M with tied head).
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
    # EleutherAI's GPT-Neo (125M / 1.3B / 2.7B with tied head): GPT-2 with local attention over
    # 256 positions in every other layer, unscaled scores and no q/k/v bias, a 2048-token context.
    **{name: dict(n_embd=C, n_layer=L, n_head=H, context_length=2048, attention_window=256, window_layers="odd",
                  scale_attention=False, qkv_bias=False)
       for name, C, L, H in (("gpt-neo-125m", 768, 12, 12), ("gpt-neo-1.3B", 2048, 24, 16),
                             ("gpt-neo-2.7B", 2560, 32, 20))},
    # Small presets for CPU training with the embedded corpus's 4096-token BPE.
    "tiny": dict(vocab_size=4096, context_length=128, n_embd=128, n_layer=4, n_head=4),
    "mini": dict(vocab_size=4096, context_length=256, n_embd=256, n_layer=6, n_head=8),
}
# Hugging Face names the same models without the "-small" suffix.
ALIASES = {"gpt2": "gpt2-small"}


def get_config(name: str, **overrides) -> GPTConfig:
    """Config for a preset name, with any fields overridden (e.g. vocab_size, dropout)."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise UserError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
    return replace(GPTConfig(**PRESETS[key]), **{k: v for k, v in overrides.items() if v is not None})
