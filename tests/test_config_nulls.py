"""A null true/false field of config.json, as transformers 5 reads it: config_flag refuses it by name where the
model_type's config class refuses it, and reads it as false where the class accepts it (NULL_AS_FALSE)."""
import pytest

from tritongpt.errors import UserError
from tritongpt.train.gpt2_weights import NULL_AS_FALSE, config_flag, tied_head

# (model_type, field): the true/false fields each family's reader passes to config_flag, for every model_type it
# reads (a field one of its branches reads for some types only is listed for all: the table must hold for each);
# tie_word_embeddings: every reader, through tied_head or its own read
_LLAMA, _MOE = ("attention_bias", "mlp_bias", "use_sliding_window"), ("attention_bias", "mlp_bias",
                                                                       "use_sliding_window", "norm_topk_prob")
_READ = {
    "gpt2": ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"),
    "gpt_neox": ("attention_bias", "use_parallel_residual"),
    **dict.fromkeys(("cohere", "cohere2"), ("use_qk_norm", "attention_bias")),
    **dict.fromkeys(("olmo2", "olmo3"), ("attention_bias",)),
    **dict.fromkeys(("mixtral", "qwen3_moe", "olmoe"), _MOE),
    **dict.fromkeys(("granite", "granitemoe"), ("attention_bias", "mlp_bias", "output_router_logits")),
    "bloom": ("apply_residual_connection_post_layernorm", "slow_but_exact"),
    **dict.fromkeys(("gemma", "gemma2", "gemma3_text"), ("attention_bias", "use_bidirectional_attention")),
    "falcon": ("parallel_attn", "multi_query", "new_decoder_architecture", "alibi", "bias"),
    "phi": ("qk_layernorm",), "stablelm": ("use_parallel_residual", "qk_layernorm", "use_qkv_bias"),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "smollm3"), _LLAMA),
    "arcee": ("attention_bias", "mlp_bias"),
    "nemotron": ("attention_bias", "mlp_bias"), "starcoder2": ("use_bias",),
    "gpt_bigcode": ("add_cross_attention", "multi_query", "scale_attn_weights"),
    "ministral": ("attention_bias", "mlp_bias"),  # (its window: layer_types, never use_sliding_window)
    "qwen2_moe": ("use_sliding_window", "norm_topk_prob", "qkv_bias"), "glm4": ("attention_bias",),
    "gpt_oss": ("attention_bias",), "ernie4_5": ("use_bias",), "helium": ("attention_bias", "mlp_bias"),
    "seed_oss": ("attention_bias", "mlp_bias", "attention_out_bias"),
}
_PAIRS = [(kind, key) for kind, keys in _READ.items() for key in (*keys, "tie_word_embeddings")] + [
    (kind, "tie_word_embeddings") for kind in ("gpt_neo", "gptj", "phi3", "mpt", "gemma3", "exaone4")]


def test_every_null_accepting_field_is_one_a_reader_reads():
    # (an entry no reader reads would be a table no test compares with transformers)
    pairs = set(_PAIRS)
    assert [(k, f) for k, fs in NULL_AS_FALSE.items() if k != "peft_lora" for f in fs if (k, f) not in pairs] == []


@pytest.mark.parametrize("kind,key", _PAIRS, ids=[f"{k}-{f}" for k, f in _PAIRS])
def test_null_refused_where_transformers_refuses_it(kind, key):
    transformers = pytest.importorskip("transformers")
    cls = transformers.CONFIG_MAPPING[kind]
    try:
        cls(**{key: None})
        refused = False
    except Exception:  # (transformers 5's strict dataclass validation error)
        refused = True
    d = {"model_type": kind, key: None}
    if refused:
        with pytest.raises(UserError, match=f"^config.json has {key} null; it must be true or false "
                                            r"\(transformers refuses null here"):
            config_flag(d, key, True, "config.json")
    else:  # the config keeps the None (or ignores the field) and its model tests it by truth: false
        assert config_flag(d, key, True, "config.json") is False


def test_null_tie_word_embeddings_refused_beside_a_head():
    import torch

    head, emb = torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3) + 1
    assert tied_head({"model_type": "llama", "tie_word_embeddings": False}, head, emb, "lm_head.weight", "c") is False
    with pytest.raises(UserError, match="^c has tie_word_embeddings null; it must be true or false "
                                         r"\(transformers refuses null here, and its default is false\)"):
        tied_head({"model_type": "llama", "tie_word_embeddings": None}, head, emb, "lm_head.weight", "c")
