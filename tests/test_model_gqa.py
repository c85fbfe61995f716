"""GPTConfig.n_kv_head (grouped-query / multi-query attention) through the whole model, both paths.

The reference path repeats each KV head for its group (MultiHeadAttention.attend); the Triton
path hands flash_attention the n_kv_head heads as they are. Tiny models: the kernels run in
Triton's interpreter without a GPU.
"""
import pytest
import torch

from parity import assert_close_rel, decode_token_by_token, greedy_on_both_paths
from test_model_paths import _compare_paths, _packed, _randomize
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel

TINY4 = dict(vocab_size=67, context_length=24, n_embd=64, n_layer=2, n_head=4)  # head dim 16


def gqa_model(n_kv_head, seed, **kw):
    torch.manual_seed(seed)
    return _randomize(GPTModel(GPTConfig(**{**TINY4, **kw}, n_kv_head=n_kv_head)))


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_triton_path_matches_reference_fp32(n_kv_head, device):
    """Same logits, loss and every gradient (W_key's and W_value's of n_kv_head heads) on both
    paths: multi-query alone, two KV heads with packed documents (the kernel's every pairing of
    groups, documents, windows and dropout: tests/test_attention_gqa.py)."""
    model = gqa_model(n_kv_head, 10 + n_kv_head, n_layer=1).to(device)  # (the grouping is each layer's own)
    assert model.trf_blocks[0].att.W_key.weight.shape == model.trf_blocks[0].att.W_value.weight.shape == \
        (n_kv_head * 16, 64)
    if n_kv_head == 1:
        idx = torch.randint(0, 67, (2, 19), device=device)
        _compare_paths(model, idx, torch.roll(idx, -1, 1), 1e-4)
    else:
        idx, doc_ids = _packed([[5, 1, 9, 6], [13, 8]], device)
        _compare_paths(model, idx, torch.roll(idx, -1, 1), 1e-4, doc_ids)


def test_gemma_heads_256_wide_over_one_kv_head_on_the_triton_path(device):
    """Gemma 3 270M's attention (4 query heads of 256 over 1 KV head, wider than n_embd): the
    Triton path takes it, with the same logits, loss and every gradient as the reference."""
    model = gqa_model(1, 7, attention_head_dim=256, n_layer=1).to(device)
    assert model.trf_blocks[0].att.W_key.weight.shape == (256, 64)
    assert model.set_kernels("triton").kernels >= {"attention"}
    idx = torch.randint(0, 67, (2, 19), device=device)
    _compare_paths(model, idx, torch.roll(idx, -1, 1), 1e-4)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_gqa_is_mha_with_each_kv_head_repeated_for_its_group(path, device):
    """A model with n_kv_head 2 computes what the GPT-2 model with 4 KV heads does when KV heads
    0, 1 are copied to heads (0, 1) and (2, 3): query head h reads KV head h // (n_head / n_kv_head)."""
    gqa = gqa_model(2, 3).to(device).set_kernels(path)
    mha = GPTModel(GPTConfig(**TINY4)).to(device).set_kernels(path)
    state = gqa.state_dict()
    for name, t in state.items():
        if ".W_key." in name or ".W_value." in name:  # [2 heads * 16, ...] -> [4 heads * 16, ...]
            state[name] = t.unflatten(0, (2, 16)).repeat_interleave(2, 0).flatten(0, 1)
    mha.load_state_dict(state)
    idx = torch.randint(0, 67, (2, 19), device=device)
    with torch.no_grad():
        assert_close_rel(gqa(idx), mha(idx), 1e-5, f"{path} logits")


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_gqa_kv_cache_holds_n_kv_head_heads_and_decodes_as_the_whole_sequence(path, device):
    model = gqa_model(1, 5).to(device).set_kernels(path).eval()
    if path == "reference":
        model = model.double()
    idx = torch.randint(0, 67, (2, 17), device=device)
    whole, cached, cache = decode_token_by_token(model, idx, singles=None if path == "reference" else 2)
    assert cache.k.shape == cache.v.shape == (2, 2, 1, 24, 16)  # [n_layer, B, n_kv_head, max_len, head_dim]
    assert_close_rel(cached, whole, 1e-12 if path == "reference" else 1e-5, f"{path} cached logits")


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_greedy_decode_same_tokens_on_both_paths(n_kv_head, device):
    model = gqa_model(n_kv_head, 6, n_layer=1).to(device).eval()
    greedy_on_both_paths(model, torch.randint(0, 67, (2, 5), device=device), 4)  # the prefill, 3 cached steps


def test_gqa_model_compiles_in_one_graph(device):
    model = gqa_model(1, 7, n_layer=1).to(device).set_kernels("triton")
    idx = torch.randint(0, 67, (2, 19), device=device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(idx, targets=torch.roll(idx, -1, 1))
    assert_close_rel(loss.detach(), model(idx, targets=torch.roll(idx, -1, 1)).detach(), 1e-6, "compiled loss")


def test_n_kv_head_config(tmp_path):
    """Checked (it divides n_head), saved with the weights and read back; configs from before the
    field read as GPT-2's (as many KV heads as heads)."""
    for bad in (3, -1, 2.5, True, "2"):
        with pytest.raises(UserError, match="GPTConfig.n_kv_head must divide n_head=4"):
            GPTConfig(**TINY4, n_kv_head=bad)
    assert GPTConfig(**TINY4).kv_heads == GPTConfig(**TINY4, n_kv_head=4).kv_heads == 4
    model = GPTModel(GPTConfig(**TINY4, n_kv_head=2))
    model.save(tmp_path / "m.safetensors")
    back = GPTModel.load(tmp_path / "m.safetensors")
    assert back.config.n_kv_head == 2 and back.trf_blocks[1].att.W_value.weight.shape == (32, 64)
    old = {k: v for k, v in GPTConfig(**TINY4).to_dict().items() if k != "n_kv_head"}
    assert GPTConfig.from_dict(old).kv_heads == 4
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in GPTModel(GPTConfig(**TINY4)).parameters())


def test_export_to_gpt2_refuses_grouped_query_attention():
    from tritongpt.train.gpt2_weights import refuse_not_gpt2

    with pytest.raises(UserError, match=r"grouped-query attention \(n_kv_head 1 key/value heads for 4 query heads\)"
                                        r", which Hugging Face's GPT-2 does not: it cannot be exported as a GPT-2 "
                                        r"folder"):
        refuse_not_gpt2(GPTModel(GPTConfig(**TINY4, n_kv_head=1)), "a GPT-2 folder")
    refuse_not_gpt2(GPTModel(GPTConfig(**TINY4, n_kv_head=4)), "a GPT-2 folder")  # as many: GPT-2 itself


def test_bench_sdpa_swap_takes_fewer_kv_heads():
    """bench train's SDPA baseline (use_sdpa_attention) on a grouped-query model: enable_gqa, the
    reference's logits, whole and decoded over the cache (SDPA without it refused the head counts)."""
    from tritongpt.bench.train_step import use_sdpa_attention

    model = gqa_model(2, 8).double().eval()
    idx = torch.randint(0, 67, (2, 17))
    with torch.no_grad():
        ref = model(idx)
        use_sdpa_attention(model)
        assert_close_rel(model(idx), ref, 1e-12, "sdpa logits")
        cache = model.new_cache(2)
        steps = [model(idx[:, :6], cache)] + [model(idx[:, t:t + 1], cache) for t in range(6, 17)]
    assert_close_rel(torch.cat(steps, 1), ref, 1e-12, "sdpa cached logits")
