"""GPT-J weights (EleutherAI's GPT-J-6B: Hugging Face's GPTJForCausalLM, model_type "gptj") into GPTModel,
and back out.

A GPT-J is a GPT-2 with RoPE (no position embeddings) and these differences:
- its blocks are parallel with ONE LayerNorm: x + attention(ln_1(x)) + mlp(ln_1(x)), GPTConfig.parallel_residual
  and shared_norm (Phi-1/1.5/2's block too);
- its q, k, v and out projections have no biases (the MLP's do): qkv_bias False; our attention's output
  projection keeps a bias, read in as zeros and written out folded into the MLP's fc_out bias, the same sum
  (both outputs join the residual together in a parallel block);
- its LM head has a bias: GPTConfig.head_bias (its weight untied, unless tie_word_embeddings: the bias stays its
  own);
- its RoPE turns the first rotary_dim (64) dimensions of each head (256 wide in GPT-J-6B) with the base
  10000, in GPT-J's own pairing: dimensions 2i and 2i + 1 turn together (rotate_every_two), where ours
  (GPT-NeoX's, Llama's) pairs i with i + rotary_dim/2 at the same frequency. A rotation is applied to q and k
  alike and q.k is blind to the order of a head's dimensions, so the loader reorders each head's first
  rotary_dim rows of q_proj and k_proj (even ones first, then odd ones: _HALF_SPLIT) and export puts them
  back: our kernels rotate as they always do, and the model computes GPT-J's function exactly (Meta's
  Llama checkpoints were converted to Hugging Face's half-split RoPE by this permutation).
What this model does not compute is refused by name: another activation than GELU, an MLP wider or narrower
than 4 n_embd, rotary_dim null (transformers' GPT-J then rotates with hidden-size-wide frequencies, which fits
one head only).
"""
from pathlib import Path

import torch

from tritongpt._types import is_int
from tritongpt.errors import UserError, read_json_object
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import (_read_tensors, config_json_gptconfig, head_count, model_with_tensors,
                                          plain_block_refusals, refuse_moe_touches, tied_head, weights_file,
                                          write_hf_folder)

MODEL_TYPE = "gptj"
# activation_function -> GPTConfig.gelu_approximate
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
# each block's tensors with a weight and a bias: ours, then Hugging Face's (under "h.{i}.")
_LAYER = (("norm1", "ln_1"), ("ff.fc1", "mlp.fc_in"), ("ff.fc2", "mlp.fc_out"))
_PROJ = (("att.W_query", "attn.q_proj"), ("att.W_key", "attn.k_proj"), ("att.W_value", "attn.v_proj"),
         ("att.out_proj", "attn.out_proj"))


def is_gptj_file(path) -> bool:
    """A Hugging Face GPT-J model.safetensors (or shard index): its config.json says so."""
    cfg_json = Path(path).parent / "config.json"
    return cfg_json.is_file() and read_json_object(cfg_json).get("model_type") == MODEL_TYPE


def half_split_order(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """The order of a head's dimensions that turns GPT-J's pairs (2i, 2i + 1) into ours (i, i + R/2):
    0, 2, ..., R - 2, 1, 3, ..., R - 1, then R..head_dim - 1 as they are (the pass-through columns)."""
    R = rotary_dim
    return torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2), torch.arange(R, head_dim)])


def _check_hf_config(cfg_json: Path, sd: dict) -> GPTConfig:
    """The GPTConfig of a GPT-J config.json, checked against the tensors beside it; what this model does not
    compute refused by name."""
    d = read_json_object(cfg_json)
    if d.get("model_type") != MODEL_TYPE:
        raise UserError(f"{cfg_json} says model_type {d.get('model_type')!r}; a GPT-J folder's is {MODEL_TYPE}")
    try:
        vocab, n_embd = sd["wte.weight"].shape
        hidden = sd["h.0.mlp.fc_in.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"{cfg_json.parent}: not a GPT-J model, missing tensor {e.args[0]!r}") from None
    n_layer = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("h.")), default=-1)
    n_head = head_count(d.get("n_head", 16), "n_head", n_embd, cfg_json)
    for key, have in (("vocab_size", vocab), ("n_embd", n_embd), ("n_layer", n_layer)):
        if key in d and d[key] != have:
            raise UserError(f"{cfg_json} says {key} {d[key]!r}, but the weights have {have}")
    if d.get("n_inner") not in (None, hidden) or hidden != 4 * n_embd:
        raise UserError(f"{cfg_json} has an MLP {hidden} wide (n_inner {d.get('n_inner')!r}); this model's GELU MLP "
                        f"is 4 n_embd wide ({4 * n_embd})")
    act = d.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise UserError(f"{cfg_json} has activation_function {act!r}; this model's GELU MLP computes "
                        f"{', '.join(map(repr, ACTIVATIONS))} only")
    head_dim = n_embd // n_head
    rotary = d.get("rotary_dim", 64)
    if not is_int(rotary) or rotary % 2 or not 2 <= rotary <= head_dim:
        raise UserError(f"{cfg_json} has rotary_dim {rotary!r}; it must be an even number of dimensions in "
                        f"[2, {head_dim}] (a head's width): transformers' GPT-J with rotary_dim null rotates with "
                        "frequencies over n_embd, which fits a single head only")
    if "lm_head.bias" not in sd:
        raise UserError(f"{cfg_json.parent}: not a GPT-J model, missing tensor 'lm_head.bias'")
    # GPTJForCausalLM ties lm_head.weight (not its bias) to wte when tie_word_embeddings says so, and
    # save_pretrained then leaves lm_head.weight out: that file is the tied model. A file with an lm_head.weight of
    # its own keeps it (transformers 5 ties only what the file leaves out). The rule of every reader: tied_head (an
    # untied config beside no head refused by name: transformers would start a random head)
    tied = tied_head(d, sd.get("lm_head.weight"), sd["wte.weight"], "lm_head.weight", cfg_json)
    return config_json_gptconfig(
        cfg_json, {"context_length": "n_positions", "norm_eps": "layer_norm_epsilon"}, vocab_size=vocab, n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, context_length=d.get("n_positions", 2048), position_encoding="rope",
        rotary_dim=0 if rotary == head_dim else rotary, norm_eps=d.get("layer_norm_epsilon", 1e-5), qkv_bias=False,
        tie_weights=tied, head_bias=True, parallel_residual=True, shared_norm=True, gelu_approximate=ACTIVATIONS[act])


def _our_tensors(sd: dict, cfg: GPTConfig) -> dict:
    """Hugging Face GPT-J tensors under our parameter names (KeyError: a tensor the file lacks): q's and k's
    rows reordered per head for our RoPE's pairs, the output projection's bias zero."""
    C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    order = half_split_order(D, cfg.rotary_dim or D)
    ours = {"tok_emb.weight": sd["wte.weight"], "final_norm.weight": sd["ln_f.weight"],
            "final_norm.bias": sd["ln_f.bias"], "out_head.bias": sd["lm_head.bias"]}
    if not cfg.tie_weights:
        ours["out_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        for mine, theirs in _PROJ:
            w = sd[f"{h}{theirs}.weight"]
            if mine in ("att.W_query", "att.W_key"):
                w = w.reshape(H, D, C)[:, order].reshape(C, C)
            ours[f"{b}{mine}.weight"] = w
        ours[b + "att.out_proj.bias"] = torch.zeros_like(sd[h + "mlp.fc_out.bias"])
        for mine, theirs in _LAYER:
            for kind in ("weight", "bias"):
                ours[f"{b}{mine}.{kind}"] = sd[f"{h}{theirs}.{kind}"]
    return ours


def load_gptj_safetensors(path) -> GPTModel:
    """GPTModel with the weights of a Hugging Face GPT-J model.safetensors (or shard index) and its
    config.json beside it."""
    path = weights_file(path, "GPT-J")
    sd = _read_tensors(path, prefix="transformer.")
    cfg = _check_hf_config(path.parent / "config.json", sd)
    return model_with_tensors(cfg, lambda: _our_tensors(sd, cfg), path)


# -- export: the inverse of _our_tensors -----------------------------------------------------------
def is_gptj_shaped(cfg: GPTConfig) -> bool:
    """RoPE over LayerNorms with a GELU MLP in a shared-norm parallel block, an LM-head bias and no q/k/v
    biases: GPT-J's pieces (a Phi has q/k/v biases), which export writes as a GPT-J (or refuses)."""
    return (cfg.position_encoding == "rope" and cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.shared_norm
            and cfg.head_bias and not cfg.has_qkv_bias)


def refuse_not_gptj(model: GPTModel, what: str) -> None:
    """What Hugging Face's GPT-J does not compute, by name."""
    cfg = model.config
    refuse_moe_touches(cfg, "GPT-J", what)
    for differs, why in ((cfg.position_encoding != "rope", f"{cfg.positions_said()}, where GPT-J rotates q and k "
                          "(RoPE)"),
                         (cfg.rope_theta != 10000.0, f"rotates with the RoPE base {cfg.rope_theta:g}, where GPT-J's is "
                          "10000"),
                         (cfg.norm != "layernorm", f"normalizes with {cfg.norm}, where GPT-J has LayerNorms"),
                         (cfg.mlp != "gelu", f"has a {cfg.mlp} MLP, where GPT-J's is GELU"),
                         (not cfg.bias, "has no biases in its MLP, where GPT-J has them"),
                         (cfg.has_qkv_bias, "has biases on q, k and v, where GPT-J has none"),
                         (not (cfg.parallel_residual and cfg.shared_norm), "has blocks of another shape than GPT-J's "
                          "(one LayerNorm read by attention and MLP side by side: parallel_residual and shared_norm)"),
                         (not cfg.head_bias, "has no LM-head bias, where GPT-J has one"),
                         (cfg.kv_heads < cfg.n_head, f"has grouped-query attention ({cfg.kv_heads} key/value heads), "
                          "where GPT-J's heads each have their own"),
                         (cfg.qk_norm, "normalizes q and k (qk_norm), which GPT-J does not"),
                         (cfg.rope_scaling is not None, "scales RoPE's frequencies (rope_scaling), which GPT-J does "
                          "not"),
                         *plain_block_refusals(cfg, "GPT-J")):
        if differs:
            raise UserError(f"this model {why}: it cannot be exported as {what}")


def _hf_tensors(model: GPTModel) -> dict:
    """Our parameters under GPTJForCausalLM's names: q's and k's rows in GPT-J's order again, the attention
    output's bias folded into fc_out's, the padding rows dropped."""
    cfg = model.config
    C, H, D, V = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.vocab_size
    back = torch.argsort(half_split_order(D, cfg.rotary_dim or D))
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf = {"transformer.wte.weight": sd["tok_emb.weight"][:V], "transformer.ln_f.weight": sd["final_norm.weight"],
          "transformer.ln_f.bias": sd["final_norm.bias"], "lm_head.bias": sd["out_head.bias"][:V]}
    if not cfg.tie_weights:  # (tied: left out, as transformers saves a tied GPT-J; its bias is its own)
        hf["lm_head.weight"] = sd["out_head.weight"][:V]
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        for mine, theirs in _PROJ:
            w = sd[f"{b}{mine}.weight"]
            if mine in ("att.W_query", "att.W_key"):
                w = w.reshape(H, D, C)[:, back].reshape(C, C)
            hf[f"{h}{theirs}.weight"] = w
        for mine, theirs in _LAYER:
            for kind in ("weight", "bias"):
                hf[f"{h}{theirs}.{kind}"] = sd[f"{b}{mine}.{kind}"]
        # x + (W_o a + b_o) + (W_2 g + b_2): one bias added to the residual, which GPT-J keeps in fc_out
        hf[h + "mlp.fc_out.bias"] = sd[b + "ff.fc2.bias"] + sd[b + "att.out_proj.bias"]
    return {k: v.to("cpu", memory_format=torch.contiguous_format, copy=True) for k, v in hf.items()}


def hf_config(cfg: GPTConfig, eos_token_id: int | None = None) -> dict:
    """GPTJConfig fields for this model: what _check_hf_config reads back."""
    return {"model_type": MODEL_TYPE, "architectures": ["GPTJForCausalLM"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.n_embd, "n_inner": None, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "rotary_dim": cfg.rotary_dim or cfg.head_dim,
            "activation_function": "gelu" if cfg.gelu_approximate == "none" else "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": cfg.tie_weights, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": None}


def export_gptj(model: GPTModel, out_dir, eos_token_id: int | None = None, overwrite: bool = False) -> list:
    """Write model as a Hugging Face GPT-J folder: model.safetensors and config.json, which
    transformers.AutoModelForCausalLM.from_pretrained(out_dir) and load_checkpoint both read.
    Returns the paths written; refuses to replace them unless overwrite."""
    refuse_not_gptj(model, "a GPT-J folder")
    return write_hf_folder(out_dir, lambda: _hf_tensors(model), hf_config(model.config, eos_token_id), overwrite)
