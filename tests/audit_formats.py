"""Audit of the Hugging Face formats, run by hand (minutes; not part of the suite, which tests each family's
chosen cases): every answer is a refusal by name or transformers' own logits, never a wrong model.

  python tests/audit_formats.py exports [FAMILY ...]   each family's tiny GPTConfig with one field changed at a
      time to each other value in VARIANTS: export_target's family refuses it by name (UserError), or exports a
      folder that transformers' AutoModelForCausalLM reads back to our logits (max abs error < 1e-4).
  python tests/audit_formats.py loaders [FAMILY ...]   each family's tiny transformers config with one config.json
      field changed at a time (a bool flipped, a number doubled or moved by one, an activation swapped): the
      model transformers builds from it, saved, is refused by name by load_checkpoint or gives its logits.
  --verbose prints every case, not only the failures (BUG: other logits; BUG-load: transformers cannot read the
  export; CRASH: an error that is not a UserError).
"""
import argparse
import tempfile
import warnings
from dataclasses import fields

import torch

from tritongpt.commands import export_target
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.gpt2_weights import load_checkpoint

TINY = dict(vocab_size=96, context_length=32, n_embd=32, n_layer=2, n_head=4)
LLAMA = dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False, n_kv_head=2, tie_weights=False,
             mlp_hidden=48)
COHERE = dict(LLAMA, norm="layernorm", norm_bias=False, parallel_residual=True, shared_norm=True, logit_scale=0.125)
# exports: a base GPTConfig per family (over TINY), then every field's other values in turn
EXPORT_BASES = {
    "GPT-2": {},
    "GPT-BigCode": dict(n_kv_head=1, tie_weights=False),
    "GPT-Neo": dict(scale_attention=False, qkv_bias=False, attention_window=8, window_layers="odd"),
    "GPT-J": dict(position_encoding="rope", rotary_dim=4, parallel_residual=True, shared_norm=True, head_bias=True,
                  qkv_bias=False, tie_weights=False),
    "Falcon": dict(position_encoding="rope", parallel_residual=True, shared_norm=True, gelu_approximate="none",
                   bias=False, n_kv_head=1),
    "Phi": dict(position_encoding="rope", rotary_dim=4, parallel_residual=True, shared_norm=True, head_bias=True,
                tie_weights=False),
    "GPT-NeoX": dict(position_encoding="rope", rotary_dim=2, parallel_residual=True, gelu_approximate="none",
                     tie_weights=False),
    "Llama": LLAMA,
    "Arcee": dict(LLAMA, mlp="relu2"),
    "Nemotron": dict(LLAMA, norm="layernorm", mlp="relu2", rotary_dim=4),
    "StarCoder2": dict(position_encoding="rope", n_kv_head=2, attention_window=8, tie_weights=False),
    "Qwen2": dict(LLAMA, qkv_bias_only=True),
    "Qwen3": dict(LLAMA, qk_norm=True),
    "Mistral": dict(LLAMA, attention_window=8),
    "Phi-3": dict(LLAMA, rotary_dim=4),
    "StableLM": dict(LLAMA, norm="layernorm", rotary_dim=4),
    "Gemma": dict(LLAMA, mlp="geglu", scale_embeddings=True, tie_weights=True),
    "Gemma 2": dict(LLAMA, mlp="geglu", scale_embeddings=True, tie_weights=True, post_norms=True, attn_softcap=50.0,
                    logit_softcap=30.0, attention_window=8, window_layers="0"),
    "OLMo 2": dict(LLAMA, pre_norms=False, post_norms=True, qk_norm=True, qk_norm_width="all"),
    "EXAONE 4": dict(LLAMA, pre_norms=False, post_norms=True, qk_norm=True, attention_window=8, window_layers="0",
                     nope_layers="1"),
    "Mixtral": dict(LLAMA, n_experts=4, experts_per_token=2),
    "Qwen2-MoE": dict(LLAMA, qkv_bias_only=True, n_experts=4, experts_per_token=2, moe_shared_hidden=24),
    "Ministral": dict(LLAMA, attention_window=8, window_layers="0"),
    "GLM-4": dict(LLAMA, qkv_bias_only=True, post_norms=True, rotary_dim=4),
    "GPT-OSS": dict(LLAMA, n_experts=4, experts_per_token=2, bias=True, attention_sinks=True, moe_bias=True,
                    moe_activation="gpt_oss", swiglu_limit=2.0, attention_window=8, window_layers="0"),
    "BLOOM": dict(position_encoding="alibi", embed_norm=True),
    "MPT": dict(position_encoding="alibi", bias=False, norm_bias=False, gelu_approximate="none"),
    "Falcon-RW": dict(position_encoding="alibi", alibi_scaled=True, gelu_approximate="none"),
    "Cohere": dict(COHERE, tie_weights=True),
    "Cohere2": dict(COHERE, attention_window=8, window_layers="0", nope_layers="1"),
    "Command R+": dict(COHERE, qk_norm=True, qk_norm_width="each"),
    "StableLM 2 12B": dict(LLAMA, norm="layernorm", rotary_dim=4, parallel_residual=True, shared_norm=True,
                           qk_norm=True, qk_norm_width="each"),
}
VARIANTS = dict(
    n_kv_head=[1, 2, 4], attention_head_dim=[16], qk_norm=[True, False], bias=[True, False],
    scale_attention=[False, True], attention_scale_width=[12], attn_softcap=[20.0], qkv_bias=[False, True],
    qkv_bias_only=[True, False], tie_weights=[True, False], vocab_multiple=[64], logit_softcap=[20.0],
    logit_scale=[0.5, 1.0], attention_window=[8, 0], window_layers=["odd", "all", "0"],
    position_encoding=["learned", "rope", "alibi"], rope_theta=[5000.0], alibi_scaled=[True, False],
    rope_scaling=[dict(rope_type="linear", factor=2.0),
                  dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16)],
    rope_local_theta=[5000.0], nope_layers=["1"], rotary_dim=[4, 0], norm=["layernorm", "rmsnorm"], norm_eps=[1e-6],
    norm_bias=[False, True], embed_norm=[True, False], mlp=["gelu", "swiglu", "geglu"], mlp_hidden=[40],
    scale_embeddings=[True, False], post_norms=[True, False], pre_norms=[False, True], qk_norm_width=["all", "head", "each"],
    parallel_residual=[True, False], gelu_approximate=["none", "tanh"], shared_norm=[True, False],
    head_bias=[True, False], n_experts=[4, 0], experts_per_token=[1, 3], moe_norm_topk=[False, True],
    moe_aux_loss=[0.01], attention_sinks=[True, False], moe_bias=[True, False], moe_activation=["gpt_oss", "glu"],
    swiglu_limit=[3.0], swiglu_alpha=[1.5])


def perturbed(model):
    """Every parameter moved off its init (unit norm weights and zero biases would hide a dropped tensor)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def compare(ours, want, ids):
    """ours' logits on ids against transformers' (want)."""
    with torch.no_grad():
        err = (ours(ids)[..., :want.shape[-1]] - want).abs().max().item()
    return ("ok" if err < 1e-4 else "BUG"), f"max err {err:.2e}"


def check_export(fields_: dict):
    from transformers import AutoModelForCausalLM

    try:
        cfg = GPTConfig(**fields_)
        family, refuse, export = export_target(cfg)
    except UserError as e:
        return "refused", str(e)[:150]
    model = perturbed(GPTModel(cfg))
    with tempfile.TemporaryDirectory() as d:
        try:
            refuse(model, f"a {family} folder")
            export(model, d, None)
        except UserError as e:
            return "refused", f"[{family}] {str(e)[:150]}"
        try:
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        except Exception as e:  # noqa: BLE001 -- any failure to read the export is the finding
            return "BUG-load", f"[{family}] {type(e).__name__}: {str(e)[:200]}"
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        want = hf(ids).logits[..., :cfg.vocab_size]
    status, msg = compare(model, want, ids)
    return status, f"[{family}] {msg}"


def audit_exports(families, verbose):
    for family in families:
        base = dict(TINY, **EXPORT_BASES[family])
        print(f"== {family} base: {' '.join(check_export(base))}", flush=True)
        for f in fields(GPTConfig):
            for value in VARIANTS.get(f.name, []):
                if base.get(f.name, f.default) == value:
                    continue
                try:
                    status, msg = check_export(dict(base, **{f.name: value}))
                except Exception as e:  # noqa: BLE001
                    status, msg = "CRASH", f"{type(e).__name__}: {str(e)[:200]}"
                if verbose or status not in ("ok", "refused"):
                    print(f"   {f.name}={value!r}: {status} {msg}", flush=True)


def loader_bases():
    """transformers config class and tiny base fields per model_type."""
    import transformers as t

    return {
        "gpt2": (t.GPT2Config, {}),
        "gpt_neo": (t.GPTNeoConfig, dict(attention_types=[[["global", "local"], 1]], window_size=8,
                                         intermediate_size=None)),
        "gptj": (t.GPTJConfig, dict(rotary_dim=4)),
        "falcon": (t.FalconConfig, dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                        bias=False)),
        "falcon_rw": (t.FalconConfig, dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                                           bias=True, alibi=True)),
        "phi": (t.PhiConfig, dict(partial_rotary_factor=0.5, intermediate_size=128)),
        "gpt_neox": (t.GPTNeoXConfig, dict(rotary_pct=0.25, intermediate_size=128)),
        "llama": (t.LlamaConfig, {}), "mistral": (t.MistralConfig, dict(sliding_window=8)),
        "qwen2": (t.Qwen2Config, {}), "qwen3": (t.Qwen3Config, {}), "phi3": (t.Phi3Config, {}),
        "stablelm": (t.StableLmConfig, {}), "gemma": (t.GemmaConfig, {}),
        "gemma2": (t.Gemma2Config, dict(sliding_window=8)), "gemma3_text": (t.Gemma3TextConfig, dict(sliding_window=8)),
        "olmo2": (t.Olmo2Config, {}), "smollm3": (t.SmolLM3Config, {}), "mixtral": (t.MixtralConfig, {}),
        "qwen3_moe": (t.Qwen3MoeConfig, dict(decoder_sparse_step=1, mlp_only_layers=[])),
        "olmoe": (t.OlmoeConfig, {}), "gpt_oss": (t.GptOssConfig, dict(sliding_window=8, head_dim=8)),
        "bloom": (t.BloomConfig, {}),
        "mpt": (t.MptConfig, dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64)),
        "cohere": (t.CohereConfig, {}), "cohere2": (t.Cohere2Config, dict(sliding_window=8, num_hidden_layers=4)),
        "exaone4": (t.Exaone4Config, dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
        "starcoder2": (t.Starcoder2Config, dict(sliding_window=8)), "nemotron": (t.NemotronConfig, {}),
        "gpt_bigcode": (t.GPTBigCodeConfig, {}),
    }


# every family's names for the tiny sizes: a config takes those it has
LOADER_SIZES = dict(vocab_size=96, hidden_size=32, n_embd=32, num_hidden_layers=2, n_layer=2, num_layers=2,
                    num_attention_heads=4, n_head=4, num_heads=4, intermediate_size=48, max_position_embeddings=64,
                    n_positions=64, n_ctx=64, head_dim=8, num_key_value_heads=2, moe_intermediate_size=24,
                    num_experts=4, num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=1,
                    pad_token_id=None)
ALTERNATIVES = {"hidden_act": ["gelu", "relu", "silu", "gelu_new", "gelu_pytorch_tanh"],
                "activation_function": ["gelu", "relu", "gelu_new"],
                "hidden_activation": ["gelu", "silu", "gelu_pytorch_tanh"]}
# fields that change no logits (dropout, ids, output flags...) or are the tiny sizes themselves
UNCHANGED = {"dtype", "torch_dtype", "architectures", "model_type", "transformers_version", "use_cache", "return_dict",
             "output_hidden_states", "output_attentions", "pad_token_id", "bos_token_id", "eos_token_id",
             "initializer_range", "initializer_factor", "output_router_logits", "router_aux_loss_coef",
             "router_z_loss_coef", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout",
             "summary_first_dropout", "classifier_dropout", "embed_dropout", "resid_dropout", "ffn_dropout",
             "vocab_size", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "add_cross_attention",
             "is_decoder", "tf_legacy_loss", "use_bfloat16", "torchscript", "problem_type", "num_labels",
             "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels",
             "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "max_window_layers", "use_sliding_window"}


def variants_of(key, value):
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value * 2] if key in LOADER_SIZES else [value * 2 if value else 1, value + 1]
    if isinstance(value, float):
        return [value * 2 if value else 0.5]
    if isinstance(value, str):
        return [a for a in ALTERNATIVES.get(key, []) if a != value]
    return []


def check_loader(cls, base, key=None, value=None):
    from transformers import AutoModelForCausalLM

    try:
        cfg = cls(**(base if key is None else {**base, key: value}))
        torch.manual_seed(0)
        # transformers 5's eager Falcon adds ALiBi twice (to the scores and in the mask): its SDPA path once
        impl = "sdpa" if cfg.model_type == "falcon" and cfg.alibi else "eager"
        hf = perturbed(AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).float())
        ids = torch.randint(2, 90, (1, 20))
        with torch.no_grad():
            want = hf(ids).logits
    except Exception as e:  # noqa: BLE001 -- transformers cannot build or run it: not a case
        return "skip", f"{type(e).__name__}: {str(e)[:80]}"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        try:
            model = load_checkpoint(d).float().eval()
        except UserError as e:
            return "refused", str(e)[:160]
        except Exception as e:  # noqa: BLE001
            return "CRASH", f"{type(e).__name__}: {str(e)[:200]}"
    return compare(model, want, ids)


def audit_loaders(families, verbose):
    bases = loader_bases()
    for family in families:
        cls, extra = bases[family]
        probe = cls()
        base = {k: v for k, v in LOADER_SIZES.items() if hasattr(probe, k)}
        base.update(extra)
        try:
            cls(**base)
        except Exception:  # noqa: BLE001 -- head_dim is a read-only property of some configs
            base.pop("head_dim", None)
        print(f"== {family} base: {' '.join(check_loader(cls, base))}", flush=True)
        for key, value in sorted(cls(**base).to_dict().items()):
            if key in UNCHANGED or key.startswith("_"):
                continue
            for other in variants_of(key, value):
                status, msg = check_loader(cls, base, key, other)
                if verbose or status in ("BUG", "CRASH"):
                    print(f"   {key}={other!r} (was {value!r}): {status} {msg}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("exports", "loaders"))
    p.add_argument("families", nargs="*", help="default: all (exports: EXPORT_BASES' names; loaders: model_types)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.what == "exports":
        audit_exports(args.families or list(EXPORT_BASES), args.verbose)
    else:
        audit_loaders(args.families or list(loader_bases()), args.verbose)


if __name__ == "__main__":
    main()
