"""The whole model on the Triton path (all four kernels, the loss too) matches the reference path.

On a machine without a GPU the kernels run through Triton's interpreter, so the model is tiny;
the CUDA-marked variant runs a GPT-2-shaped stack on a GPU.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parity import assert_close_rel, report, decode_token_by_token, greedy_on_both_paths
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel

TINY = dict(vocab_size=67, context_length=24, n_embd=32, n_layer=2, n_head=2)


class CountOps(TorchDispatchMode):
    """Counts the tritongpt custom ops dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "tritongpt":
            self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _randomize(model):
    # fresh init has zero biases and unit LayerNorms; random ones exercise every gradient path
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _loss_and_grads(model, idx, targets, doc_ids=None):
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(idx, doc_ids=doc_ids)
    loss = model(idx, targets=targets, doc_ids=doc_ids)  # the model's own loss: lm_loss or the Triton cross-entropy
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # (LoRA: A, B)
    return logits.detach(), loss.detach(), grads


def _compare_paths(model, idx, targets, rel_tol, doc_ids=None):
    model.set_kernels("reference")
    ref_logits, ref_loss, ref_grads = _loss_and_grads(model, idx, targets, doc_ids)
    model.set_kernels("triton")
    logits, loss, grads = _loss_and_grads(model, idx, targets, doc_ids)
    model.set_kernels("reference")
    assert_close_rel(logits, ref_logits, rel_tol, "logits")
    assert_close_rel(loss, ref_loss, rel_tol, "loss")
    for name in ref_grads:
        if name.endswith("W_key.bias"):
            # softmax ignores a shift shared by a whole row of scores, and q.b_k is such a shift:
            # this gradient is zero in exact arithmetic, so only its size can be checked
            assert ref_grads[name].abs().max() < 1e-6 and grads[name].abs().max() < 1e-6
            continue
        assert_close_rel(grads[name], ref_grads[name], rel_tol, f"grad {name}")


def test_tiny_model_triton_path_matches_reference_fp32(device):
    torch.manual_seed(0)
    model = _randomize(GPTModel(GPTConfig(**TINY))).to(device)
    idx = torch.randint(0, 67, (2, 19), device=device)  # 19: not a multiple of any block size
    targets = torch.randint(0, 67, (2, 19), device=device)
    targets[0, :4] = -100  # ignored positions (a prompt under SFT) count nowhere
    _compare_paths(model, idx, targets, 1e-4)


def _packed(lengths_per_row, device, seed=0):
    """Token rows of packed documents and their doc_ids (a document id per token)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, TINY["vocab_size"], (len(lengths_per_row), sum(lengths_per_row[0])), generator=g)
    doc_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] for lengths in lengths_per_row])
    return idx.to(device), doc_ids.to(device)


def test_packed_documents_triton_path_matches_reference_fp32(device):
    """doc_ids through the whole model: both paths, logits, loss and every gradient."""
    torch.manual_seed(1)
    model = _randomize(GPTModel(GPTConfig(**TINY))).to(device)
    idx, doc_ids = _packed([[5, 1, 9, 6], [13, 8]], device)
    targets = torch.randint(0, 67, idx.shape, device=device)
    targets[:, 0] = -100
    _compare_paths(model, idx, targets, 1e-4, doc_ids)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_a_packed_row_is_its_documents_alone(path, device):
    """Each document of a packed row gets the logits and per-token losses it gets alone: its
    positions count from 0 and it attends to itself only (float64 on the reference path)."""
    torch.manual_seed(2)
    model = _randomize(GPTModel(GPTConfig(**TINY))).to(device).set_kernels(path)
    if path == "reference":
        model = model.double()
    lengths = [6, 1, 11, 3]
    idx, doc_ids = _packed([lengths], device, seed=3)
    doc_ids = doc_ids % 2 * 7  # ids 0 7 0 7: a document is a run of equal ids, and an id may come back
    targets = torch.randint(0, 67, idx.shape, device=device)
    with torch.no_grad():
        packed = model(idx, doc_ids=doc_ids)
        losses = model(idx, targets=targets, reduction="none", doc_ids=doc_ids)
        mixed = model(idx)  # without doc_ids the later documents see the earlier ones
        at = 0
        for n in lengths:
            part = slice(at, at + n)
            alone = model(idx[:, part])
            assert_close_rel(packed[:, part], alone, 1e-12 if path == "reference" else 1e-5, f"{n} logits")
            assert_close_rel(losses[:, part], model(idx[:, part], targets=targets[:, part], reduction="none"),
                             1e-12 if path == "reference" else 1e-5, f"{n} losses")
            if at:
                assert (mixed[:, part] - alone).abs().max() > 1e-3
            at += n


def test_doc_ids_bad_input(device):
    model = GPTModel(GPTConfig(**TINY)).to(device)
    idx, doc_ids = _packed([[4, 6]], device)
    with pytest.raises(UserError, match="not with a KV cache"):
        model(idx, model.new_cache(1), doc_ids=doc_ids)
    with pytest.raises(UserError, match=r"doc_ids must have idx's shape \(1, 10\)"):
        model(idx, doc_ids=doc_ids[:, :5])
    with pytest.raises(UserError, match="doc_ids must be an integer tensor of document ids, got torch.float32"):
        model(idx, doc_ids=doc_ids.float())
    with pytest.raises(UserError, match="got list"):
        model(idx, doc_ids=doc_ids.tolist())
    with pytest.raises(UserError, match="doc_ids must be an integer tensor of document ids, got torch.bool"):
        model(idx, doc_ids=doc_ids.bool())


def test_activation_checkpointing_with_doc_ids_gives_the_same_gradients(device):
    torch.manual_seed(4)
    # one block: the checkpoint call hands each block the same doc_ids; the step between two checkpointed blocks
    # is test_activation_checkpointing_same_step_less_saved's
    model = _randomize(GPTModel(GPTConfig(**{**TINY, "n_layer": 1}))).to(device).set_kernels("triton")
    idx, doc_ids = _packed([[7, 12]], device, seed=5)
    targets = torch.randint(0, 67, idx.shape, device=device)
    logits, loss, grads = _loss_and_grads(model, idx, targets, doc_ids)
    model.set_activation_checkpointing(True)
    _, loss2, grads2 = _loss_and_grads(model, idx, targets, doc_ids)
    assert torch.equal(loss, loss2) and all(torch.equal(grads[n], grads2[n]) for n in grads)
    # the documents are kept apart in this model (its second one's logits are its own alone's), so the gradients'
    # equality above says the recomputation kept them apart too (a block ignoring doc_ids changes these; the
    # positions' per-document restart alone would change a loss compared without doc_ids)
    with torch.no_grad():
        alone = model(idx[:, 7:])
    torch.testing.assert_close(logits[:, 7:], alone, rtol=1e-4, atol=1e-5)


def test_triton_path_runs_every_kernel_and_the_reference_path_none(device):
    """Numbers alone cannot show that a module took the kernel (the reference gives the same
    ones): count the custom ops one training step dispatches on each path."""
    torch.manual_seed(3)
    model = _randomize(GPTModel(GPTConfig(**TINY))).to(device)
    idx = torch.randint(0, 67, (2, 9), device=device)
    counts = {}
    for path in ("reference", "triton"):
        model.set_kernels(path)
        with CountOps() as mode:
            model(idx, targets=idx).backward()
        counts[path] = mode.ops
    model.set_kernels("reference")
    assert counts["reference"] == Counter()
    n = TINY["n_layer"]
    # every LayerNorm but the first block's first takes the residual add before it (add_layer_norm_fwd)
    want = {"layer_norm_fwd": 1, "add_layer_norm_fwd": 2 * n, "layer_norm_bwd": 2 * n + 1, "add_layer_norm_bwd": 0,
            "gelu_mlp_fwd": n, "gelu_mlp_bwd": n,
            "flash_attn_fwd": n, "flash_attn_bwd": n}
    got = counts["triton"]
    assert {k: got[k] for k in want} == want, dict(got)
    assert got["cross_entropy_fwd"] >= 1  # the fused LM head + loss


def test_triton_path_under_bf16_autocast_matches_the_reference(device):
    """Under bf16 autocast the residual stream stays fp32 and the attention's and MLP's outputs are
    bf16: each fused residual add + LayerNorm writes x's fp32 gradient and the bf16 one of the
    sublayer output in one pass (add_layer_norm_bwd, twice a block). Against the model in float64,
    the Triton path's loss is within bf16's 1e-2 and each gradient's error at most 2x the reference
    path's under the same autocast (FlashAttention's rule: no worse than PyTorch's own bf16)."""
    import copy

    torch.manual_seed(9)
    model = _randomize(GPTModel(GPTConfig(**TINY))).to(device)
    idx = torch.randint(0, 67, (2, 9), device=device)
    results = {}
    for path in ("reference", "triton"):
        model.set_kernels(path).zero_grad(set_to_none=True)
        with CountOps() as mode:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(idx, targets=idx)
            loss.backward()
        results[path] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, mode.ops)
    model.set_kernels("reference")
    assert results["triton"][2]["add_layer_norm_bwd"] == 2 * TINY["n_layer"], dict(results["triton"][2])
    model64 = copy.deepcopy(model).double()
    loss64 = model64(idx, targets=idx)
    loss64.backward()
    assert_close_rel(results["triton"][0], loss64, 1e-2, "loss vs float64")
    for name, g64 in model64.named_parameters():
        tri, ref = results["triton"][1][name], results["reference"][1][name]
        if name.endswith("W_key.bias"):  # 0 in exact arithmetic (a row's scores all shift by q.b): rounding only
            assert tri.abs().max() < 1e-4 and ref.abs().max() < 1e-4
            continue
        ref_err = report(ref, g64.grad)[1]
        assert_close_rel(tri, g64.grad, 2 * ref_err, f"grad {name} (reference path's bf16 error {ref_err:.1e})")


def test_attention_dropout_on_the_triton_path_follows_train_eval_and_set_dropout(device):
    """The in-kernel attention dropout is the model's: on in train mode, off in eval mode, at
    the rate of the module's attn_drop (as on the reference path: setting every nn.Dropout's p
    to 0 turns it off too), and set_dropout (which DPO and RLHF call) reaches it. Only attention
    dropout is on here, so any change between forwards is the kernel's."""
    torch.manual_seed(4)
    model = _randomize(GPTModel(GPTConfig(**TINY, dropout=0.3))).to(device)
    idx = torch.randint(0, 67, (2, 11), device=device)
    model.eval()
    with torch.no_grad():
        ref = model(idx)
        model.set_kernels("triton")
        assert_close_rel(model(idx), ref, 1e-4, "eval logits, dropout 0.3")  # eval: no dropout
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Dropout) and not name.endswith("attn_drop"):
                m.p = 0.0
        model.train()
        a, b = model(idx), model(idx)
        assert (a - ref).abs().max() > 1e-3 and (a - b).abs().max() > 1e-3  # attention dropout bites
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        assert torch.equal(model(idx), model(idx)), "attn_drop.p = 0 must turn the kernel's dropout off"
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.3
        model.set_dropout(0.0)
        a, b = model(idx), model(idx)
        assert torch.equal(a, b)
        assert_close_rel(a, ref, 1e-4, "train logits after set_dropout(0)")
    model.set_kernels("reference")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_path_on_a_gpu_that_is_not_the_current_one():
    """Triton launches on the current device: the kernels must switch to their tensors' GPU
    (a model on cuda:1 while cuda:0 is current, as in one process driving several GPUs)."""
    torch.manual_seed(0)
    model = _randomize(GPTModel(GPTConfig(**TINY))).to("cuda:1")
    idx = torch.randint(0, 67, (2, 19), device="cuda:1")
    with torch.cuda.device(0):
        _compare_paths(model, idx, torch.roll(idx, -1, 1), 1e-4)


def test_greedy_decode_with_kv_cache_same_tokens_on_both_paths(device):
    torch.manual_seed(1)
    model = _randomize(GPTModel(GPTConfig(**TINY))).to(device).eval()
    greedy_on_both_paths(model, torch.randint(0, 67, (2, 5), device=device), 10)


@pytest.mark.cuda
def test_gpt2_shaped_stack_triton_matches_reference_on_gpu(monkeypatch):
    torch.manual_seed(2)
    cfg = GPTConfig(vocab_size=50257, context_length=1024, n_embd=768, n_layer=2, n_head=12)
    model = _randomize(GPTModel(cfg)).cuda()
    idx = torch.randint(0, 50257, (2, 1000), device="cuda")
    targets = torch.randint(0, 50257, (2, 1000), device="cuda")
    # fp32 weights: the Triton matmuls use ieee fp32 dots, so the reference must not use TF32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _compare_paths(model, idx, targets, 1e-4)


def test_whole_model_on_triton_path_compiles_in_one_graph(device):
    """torch.compile of the model on the Triton path (the loss included): the kernels are custom
    ops with fake impls, so Dynamo captures forward and loss without a graph break (a padded
    vocabulary's and a local model's window bounds too)."""
    torch.manual_seed(4)
    # one block: every op in the graph, half the interpreter's launches; the padding and the window in one model,
    # one compile (~3 s each): either one breaking the graph fails fullgraph, and the gradients are checked below
    cfg = GPTConfig(**{**TINY, "n_layer": 1}, vocab_multiple=16, attention_window=6)
    model = _randomize(GPTModel(cfg)).to(device).set_kernels("triton")
    idx = torch.randint(0, 67, (2, 19), device=device)
    targets = torch.randint(0, 67, (2, 19), device=device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(idx, targets=targets)
    loss.backward()
    got = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets=targets)
    loss.backward()
    assert_close_rel(got[0], loss.detach(), 1e-6, "compiled loss")
    for n, p in model.named_parameters():
        if n.endswith("W_key.bias"):  # zero in exact arithmetic (see _compare_paths)
            continue
        assert_close_rel(got[1][n], p.grad, 1e-5, f"compiled grad {n}")


def test_padded_vocabulary_triton_path_matches_reference(device):
    # GPTConfig.vocab_multiple: 67 classes in 80 rows. The padding rows are randomized here (they
    # start at zero), so a path that let them into the softmax or the gradient would differ.
    torch.manual_seed(2)
    model = _randomize(GPTModel(GPTConfig(**TINY, vocab_multiple=16))).to(device)
    idx = torch.randint(0, 67, (2, 19), device=device)
    targets = torch.randint(0, 67, (2, 19), device=device)
    targets[1, :5] = -100
    _compare_paths(model, idx, targets, 1e-4)
    # per-token losses (DPO, RLHF): the cross-entropy kernel on the logits' view of the padded head, and its backward
    # from a gradient that differs by position (DPO and KTO train through it: its upstream gradient 1% off passed
    # every other end-to-end test)
    weights = torch.randn(idx.shape, generator=torch.Generator().manual_seed(0)).to(device)
    per_token, grads = {}, {}
    for path in ("reference", "triton"):
        model.set_kernels(path).zero_grad(set_to_none=True)
        per_token[path] = model(idx, targets=targets, reduction="none")
        (per_token[path] * weights).sum().backward()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.set_kernels("reference")
    assert_close_rel(per_token["triton"].detach(), per_token["reference"].detach(), 1e-4, "per-token losses")
    for name, ref in grads["reference"].items():
        if name.endswith("W_key.bias"):  # 0 in exact arithmetic (see _compare_paths): its size only
            assert ref.abs().max() < 1e-6 and grads["triton"][name].abs().max() < 1e-6
            continue
        assert_close_rel(grads["triton"][name], ref, 1e-4, f"per-token losses' grad {name}")


def test_double_backward_is_refused_by_every_kernel(device):
    """A Hessian or a gradient penalty (create_graph=True) through a Triton kernel raises: the
    backward ops have no derivative of their own (a Hessian came out all zeros through the MLP,
    LayerNorm and fused LM head), and the reference path is the one that has it."""
    from tritongpt.kernels.attention import flash_attention
    from tritongpt.kernels.cross_entropy import cross_entropy, linear_cross_entropy
    from tritongpt.kernels.layernorm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
    from tritongpt.kernels.mlp import gelu_mlp

    torch.manual_seed(7)
    r = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
    t = torch.randint(0, 20, (6,), device=device)
    x, w, b = r(6, 16), r(16), r(16)
    q, k, v = r(1, 2, 5, 16), r(1, 2, 5, 16), r(1, 2, 5, 16)
    logits = r(6, 20)
    cases = {"layer_norm": (lambda: layer_norm(x, w, b), x),
             "add_layer_norm": (lambda: add_layer_norm(x, x.exp(), w, b)[1], x),
             "rms_norm": (lambda: rms_norm(x, w), x),
             "add_rms_norm": (lambda: add_rms_norm(x, x.exp(), w)[1], x),
             "gelu_mlp": (lambda: gelu_mlp(x, r(24, 16), None, r(16, 24), None), x),
             "flash_attention": (lambda: flash_attention(q, k, v, causal=True), q),
             "cross_entropy": (lambda: cross_entropy(logits, t), logits),
             "linear_cross_entropy": (lambda: linear_cross_entropy(x, r(20, 16), t), x)}
    for name, (f, wrt) in cases.items():
        out = f()
        with pytest.raises(RuntimeError, match=f"{name}: the Triton kernel has no second derivative"):
            torch.autograd.grad(out.sum(), wrt, create_graph=True)
    model = _randomize(GPTModel(GPTConfig(**TINY))).to(device).set_kernels("triton")
    idx = torch.randint(0, 67, (2, 7), device=device)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(model(idx, targets=idx), list(model.parameters()), create_graph=True)


# -- activation checkpointing ---------------------------------------------------------------------
def _saved_activation_bytes(model, idx, targets):
    """Bytes autograd saves for backward outside the parameters, as the step's loss is built
    (what torch.utils.checkpoint keeps inside a block is its own business: only its input)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, targets=targets)
    return sum(saved.values()), loss


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_activation_checkpointing_same_step_less_saved(device, path):
    """set_activation_checkpointing: the loss, every gradient (with dropout on: the recomputed
    forward must draw the same masks, and on the Triton path the same attention seed) and the
    RNG state after the step are those of the plain model, while the blocks save nothing for
    backward but their input."""
    torch.manual_seed(5)
    model = _randomize(GPTModel(GPTConfig(**TINY, dropout=0.2))).to(device).set_kernels(path)
    idx = torch.randint(0, 67, (2, 19), device=device)
    targets = torch.randint(0, 67, (2, 19), device=device)
    results = {}
    for on in (False, True):
        model.set_activation_checkpointing(on)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        saved, loss = _saved_activation_bytes(model, idx, targets)
        loss.backward()
        after = torch.randn(3)  # the RNG goes on as it would have: training is not shifted
        results[on] = saved, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, after
    (plain_saved, plain_loss, plain_grads, plain_after), (ck_saved, ck_loss, ck_grads, ck_after) = \
        results[False], results[True]
    assert torch.equal(ck_after, plain_after)
    assert_close_rel(ck_loss, plain_loss, 1e-6, "loss with activation checkpointing")
    for n in plain_grads:
        if n.endswith("W_key.bias"):  # zero in exact arithmetic (see _compare_paths)
            continue
        assert_close_rel(ck_grads[n], plain_grads[n], 1e-5, f"grad {n} with activation checkpointing")
    # What is left is the embeddings', the final LayerNorm's, the head's and the loss's; each
    # of the two blocks saved more than all of that.
    per_block = (plain_saved - ck_saved) / 2
    assert per_block > ck_saved, (plain_saved, ck_saved)
    with torch.no_grad():  # inference: nothing recorded, nothing recomputed, the same logits
        assert torch.equal(model.eval()(idx), model.set_activation_checkpointing(False)(idx))


def test_activation_checkpointing_compiles_in_one_graph(device):
    """Under torch.compile (fullgraph) the checkpointed blocks and the Triton custom ops trace
    together, and give the eager gradients."""
    torch.manual_seed(6)
    model = _randomize(GPTModel(GPTConfig(**{**TINY, "n_layer": 1}))).to(device).set_kernels("triton")
    model.set_activation_checkpointing(True)
    idx = torch.randint(0, 67, (2, 19), device=device)
    targets = torch.randint(0, 67, (2, 19), device=device)
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, targets=targets)
    loss.backward()
    got = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_activation_checkpointing(False)(idx, targets=targets).backward()
    for n, p in model.named_parameters():
        if not n.endswith("W_key.bias"):
            assert_close_rel(got[1][n], p.grad, 1e-5, f"compiled checkpointed grad {n}")


def test_activation_checkpointing_flag_is_a_bool():
    model = GPTModel(GPTConfig(**TINY))
    for bad in ("no", 1):
        with pytest.raises(UserError, match="True or False"):
            model.set_activation_checkpointing(bad)
    assert model.set_activation_checkpointing() is model and model.activation_checkpointing


@pytest.mark.cuda
def test_activation_checkpointing_lowers_memory_on_gpu():
    """GPT-2 width and context, bf16 autocast, Triton path: what a forward leaves held for backward
    (about 13 bf16 [B, T, C] tensors per block plus the bf16 weight copies, ~0.7 GB here) falls to
    the blocks' fp32 inputs plus those copies (~0.16 GB): under 0.4x; and so does the step's peak."""
    torch.manual_seed(7)
    cfg = GPTConfig(vocab_size=1024, context_length=1024, n_embd=768, n_layer=4, n_head=12, kernels="triton")
    model = GPTModel(cfg).cuda()
    idx = torch.randint(0, 1024, (8, 1024), device="cuda")
    held, peaks = {}, {}
    for on in (False, True):
        model.set_activation_checkpointing(on).zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, targets=idx)
        held[on] = torch.cuda.memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        peaks[on] = torch.cuda.max_memory_allocated() - base
        del loss
    print(f"held after forward {held}, step peak {peaks} (bytes)")
    assert held[True] < 0.4 * held[False], held
    assert peaks[True] < peaks[False], peaks


def test_loss_routing_fused_for_mean_and_sum_kernel_on_logits_per_token(device):
    """With "cross_entropy" in the kernels, a mean or summed loss takes the fused LM head + loss
    (the out_head module never runs: no whole logits), and per-token losses the cross-entropy
    kernel on the head's logits; the reference path dispatches no tritongpt op."""
    torch.manual_seed(8)
    model = GPTModel(GPTConfig(**TINY)).to(device)
    head_calls = []
    model.out_head.register_forward_hook(lambda mod, args, out: head_calls.append(1))
    idx = torch.randint(0, 67, (2, 7), device=device)
    for kernels, reduction, fused in (("cross_entropy", "mean", True), ("cross_entropy", "sum", True),
                                      ("cross_entropy", "none", False), ("reference", "none", None)):
        model.set_kernels(kernels)
        head_calls.clear()
        with CountOps() as mode:
            model(idx, targets=idx, reduction=reduction)
        assert bool(head_calls) == (fused is not True), (kernels, reduction)
        assert (mode.ops["cross_entropy_fwd"] > 0) == (fused is not None), (kernels, reduction, dict(mode.ops))


def test_activation_checkpointing_only_where_gradients_are_recorded(monkeypatch):
    """Off for a new model; when on, torch.utils.checkpoint wraps each block in a forward that
    records gradients and none under no_grad or inference_mode. With a KV cache it is never used:
    a frozen model's chunked forward (grad mode on, nothing requiring grad) still fills the cache
    and matches the whole-sequence logits, and a trainable one is refused as without checkpointing."""
    import torch.utils.checkpoint

    model = GPTModel(GPTConfig(**TINY))
    assert model.activation_checkpointing is False
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_activation_checkpointing(True)
    idx = torch.randint(0, 67, (2, 9))
    with torch.no_grad():
        model(idx)
    with torch.inference_mode():
        model(idx)
    assert calls == []
    model(idx, targets=idx).backward()
    assert len(calls) == TINY["n_layer"]
    with pytest.raises(UserError, match="the KV cache is for inference"):
        model(idx[:, :4], model.new_cache(2))
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    full = model(idx)
    cache = model.new_cache(2)
    parts = [model(idx[:, :4], cache), model(idx[:, 4:], cache)]
    assert cache.pos == 9
    torch.testing.assert_close(torch.cat(parts, 1), full)


def test_activation_checkpointing_trains_the_blocks_under_frozen_embeddings():
    """Embeddings frozen (fine-tuning the blocks only): the blocks' input then needs no gradient,
    and a reentrant checkpoint would give the blocks' weights none either (torch only warns): the
    same gradients as without checkpointing."""
    torch.manual_seed(9)
    model = _randomize(GPTModel(GPTConfig(**TINY)))
    model.tok_emb.weight.requires_grad_(False)  # the tied head with it
    model.pos_emb.weight.requires_grad_(False)
    idx = torch.randint(0, 67, (2, 9))
    grads = {}
    for on in (False, True):
        model.set_activation_checkpointing(on).zero_grad(set_to_none=True)
        model(idx, targets=idx).backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, g in grads[False].items():
        assert grads[True][name] is not None, name
        torch.testing.assert_close(grads[True][name], g, msg=name)


# ----------------------------------------------------------------------------- local attention
@pytest.mark.parametrize("window_layers", ["all", "odd"])
def test_local_attention_triton_path_matches_reference_fp32(window_layers, device):
    """GPTConfig.attention_window through the whole model: both paths give the same logits, loss
    and every gradient, a window in every layer alone, in odd layers with packed documents (the
    kernel's other pairings: tests/test_attention.py); the window bites (the logits differ
    from the dense model's with the same weights)."""
    torch.manual_seed(4)
    model = _randomize(GPTModel(GPTConfig(**TINY, attention_window=5, window_layers=window_layers))).to(device)
    assert [b.att.window for b in model.trf_blocks] == ([5, 5] if window_layers == "all" else [0, 5])
    if window_layers == "all":
        idx = torch.randint(0, 67, (2, 19), device=device)
        _compare_paths(model, idx, torch.roll(idx, -1, 1), 1e-4)
    else:
        idx, doc_ids = _packed([[5, 1, 9, 6], [13, 8]], device)
        _compare_paths(model, idx, torch.roll(idx, -1, 1), 1e-4, doc_ids)
    dense = GPTModel(GPTConfig(**TINY)).to(device)
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert report(model(idx), dense(idx))[1] > 1e-2


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_local_attention_decodes_with_the_kv_cache_as_without(path, device):
    """With a window shorter than the text, decoding one token at a time over the KV cache gives
    the logits of the whole sequence run at once (the window slides over the cached keys: the
    reference masks by absolute position, the kernel by per-row bounds at Tq < Tk)."""
    torch.manual_seed(5)
    model = _randomize(GPTModel(GPTConfig(**TINY, attention_window=4))).to(device).set_kernels(path).eval()
    if path == "reference":
        model = model.double()
    idx = torch.randint(0, 67, (2, 17), device=device)
    whole, cached, _ = decode_token_by_token(model, idx, singles=None if path == "reference" else 4)
    assert_close_rel(cached, whole, 1e-12 if path == "reference" else 1e-5, f"{path} cached logits")


def test_local_attention_greedy_decode_same_tokens_on_both_paths(device):
    torch.manual_seed(6)
    model = _randomize(GPTModel(GPTConfig(**TINY, attention_window=3, window_layers="odd"))).to(device).eval()
    greedy_on_both_paths(model, torch.randint(0, 67, (2, 5), device=device), 12)


def test_attention_window_config(tmp_path):
    """The window is part of the model: checked, saved with the weights and read back; configs
    from before the fields read as dense."""
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(UserError, match="GPTConfig.attention_window must be an integer >= 0"):
            GPTConfig(**TINY, attention_window=bad)
    with pytest.raises(UserError, match="GPTConfig.window_layers must be all, odd or a comma list of layer indices "
                                        "\\(\"0,1,2,3,4,6\"\\), got 'even'"):
        GPTConfig(**TINY, window_layers="even")
    model = GPTModel(GPTConfig(**TINY, attention_window=7, window_layers="odd"))
    model.save(tmp_path / "m.safetensors")
    back = GPTModel.load(tmp_path / "m.safetensors")
    assert (back.config.attention_window, back.config.window_layers) == (7, "odd")
    assert [b.att.window for b in back.trf_blocks] == [0, 7]
    old = {k: v for k, v in GPTConfig(**TINY).to_dict().items() if k not in ("attention_window", "window_layers")}
    assert GPTConfig.from_dict(old).attention_window == 0
    import numpy as np  # numpy's integers are windows too, kept as an int (the config is saved as JSON)

    assert type(GPTConfig(**TINY, attention_window=np.int64(3)).attention_window) is int
    # a window alone makes every layer local (window_layers' default, pretrain without --window-layers)
    assert [b.att.window for b in GPTModel(GPTConfig(**TINY, attention_window=3)).trf_blocks] == [3, 3]


def test_a_window_of_one_attends_to_each_position_alone():
    """window 1 (the smallest): the reference masks every key but the query's own, so the
    attention output is v, with a KV cache too (the kernel's case: test_attention's window edges)."""
    from tritongpt.model.layers import MultiHeadAttention

    att = MultiHeadAttention(32, 2, 24, window=1)
    q, k, v = torch.randn(3, 2, 2, 9, 16).unbind(0)
    torch.testing.assert_close(att.attend(q, k, v), v)
    torch.testing.assert_close(att.attend(q[:, :, -2:], k, v), v[:, :, -2:])


# ----------------------------------------------------------------------------- every family on both paths
# The model families whose whole-model parity (logits, loss and every gradient, Triton path against the reference
# and both against float64) no other test checks: the others' tests compare loss and gradients to float64 only
# (test_gemma, test_neox, test_phi, test_olmo, test_stablelm, test_granite, test_cohere, test_lora) or logits
# only (the transformers comparisons). Widths not powers of two (n_embd 48 in 3 heads of 16, gated MLPs 40 wide),
# one layer (the layer-to-layer paths are the GPT-2 tests' above) and T 19 (no multiple of a block size): each
# about a second under the interpreter.
FAMILY = dict(vocab_size=67, context_length=24, n_embd=48, n_layer=1, n_head=3)
LLAMA_LIKE = dict(position_encoding="rope", rope_theta=500.0, norm="rmsnorm", mlp="swiglu", mlp_hidden=40,
                  bias=False, tie_weights=False)
FAMILIES = {
    # Llama 3.1's RoPE scaling, Qwen2's q/k/v-only biases (the key's rotated by RoPE: a gradient of its own),
    # Mistral's window, GQA 3:1
    "llama3-qwen2-mistral": dict(LLAMA_LIKE, qkv_bias_only=True, n_kv_head=1, attention_window=7,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Gemma 2: both soft caps (small enough to bend), a scale width, sandwich norms, GeGLU, q/k norms, heads of 32
    "gemma2-softcaps": dict(LLAMA_LIKE, mlp="geglu", n_kv_head=1, attention_head_dim=32, attention_scale_width=24,
                            attn_softcap=1.5, logit_softcap=3.0, post_norms=True, scale_embeddings=True,
                            qk_norm=True, attention_window=5),
    # BLOOM: ALiBi of 3 heads (not a power of two: the interleaved slopes), the embeddings' own LayerNorm
    "bloom": dict(position_encoding="alibi", embed_norm=True),
    # MPT's bias-free LayerNorms and Falcon-RW's ALiBi scaled with the scores
    "mpt-falcon-rw": dict(position_encoding="alibi", alibi_scaled=True, norm_bias=False, bias=False),
    # Falcon-7B: one norm for the parallel attention and MLP, multi-query, exact GELU
    "falcon": dict(position_encoding="rope", rope_theta=500.0, parallel_residual=True, shared_norm=True,
                   n_kv_head=1, bias=False, gelu_approximate="none"),
    # OLMoE-like: GeGLU experts, top-1 not renormalized, the aux loss on
    "moe-geglu-top1": dict(LLAMA_LIKE, mlp="geglu", n_experts=3, experts_per_token=1, moe_norm_topk=False,
                           moe_aux_loss=0.02),
    # LoRA on a Llama-shaped model (the base frozen: A's and B's gradients, the attention's K/V of one head)
    "lora-llama": dict(LLAMA_LIKE, n_kv_head=1, lora_rank=4, lora_alpha=8.0),
}


def _family_model(kw, seed):
    torch.manual_seed(seed)
    # a config with lora_rank builds the model with LoRA on (the base frozen); _randomize moves B off zero too,
    # where it would give A no gradient
    return _randomize(GPTModel(GPTConfig(**{**FAMILY, **kw})))


def _family_case(kw, family, device):
    """The family's model (seeded by its name), its float64 copy, and a batch: 19 tokens (no multiple of a block),
    the second row's first 3 targets ignored."""
    import copy

    model = _family_model(kw, seed=len(family)).to(device)
    idx = torch.randint(0, 67, (2, 19), device=device)
    targets = torch.randint(0, 67, (2, 19), device=device)
    targets[1, :3] = -100
    return model, copy.deepcopy(model).double(), idx, targets


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_triton_path_matches_reference_and_float64(family, device):
    """Logits, loss and every trainable parameter's gradient: the Triton path against the reference path (fp32,
    1e-4), and each against the model in float64 on the reference path (1e-4); the Triton path runs the
    attention, MLP and norm kernels (counted, so that a silent fallback to the reference fails)."""
    kw = FAMILIES[family]
    model, model64, idx, targets = _family_case(kw, family, device)
    ref = _loss_and_grads(model.set_kernels("reference"), idx, targets)
    with CountOps() as mode:
        got = _loss_and_grads(model.set_kernels("triton"), idx, targets)
    model.set_kernels("reference")
    ops = mode.ops
    assert ops["flash_attn_bwd"] == model.config.n_layer, dict(ops)
    assert ops["gelu_mlp_bwd"] + ops["swiglu_mlp_bwd"] + ops["moe_mlp_bwd"] == model.config.n_layer, dict(ops)
    assert ops["layer_norm_bwd"] + ops["rms_norm_bwd"] + ops["add_layer_norm_bwd"] + ops["add_rms_norm_bwd"] > 0
    assert ops["cross_entropy_bwd"] >= 1, dict(ops)  # the loss too (the fused LM head's, or on the logits)
    want = _loss_and_grads(model64, idx, targets)
    assert set(got[2]) == set(ref[2]) == set(want[2]) and ref[2]
    assert_close_rel(got[0], ref[0], 1e-4, "logits")
    assert_close_rel(got[1], ref[1], 1e-5, "loss")
    for path, (logits, loss, grads) in (("triton", got), ("reference", ref)):
        assert_close_rel(logits, want[0], 1e-4, f"{path} logits vs float64")
        assert_close_rel(loss, want[1], 1e-5, f"{path} loss vs float64")
        for name, g in want[2].items():
            if name.endswith("W_key.bias") and kw.get("position_encoding") != "rope":
                # unrotated, q.b_k shifts a whole row of scores, which softmax ignores: zero in exact arithmetic
                assert g.abs().max() < 1e-12 and grads[name].abs().max() < 1e-6, name
                continue
            if path == "triton":
                assert_close_rel(grads[name], ref[2][name], 1e-4, f"grad {name}")
            assert_close_rel(grads[name], g, 1e-4, f"{path} grad {name} vs float64")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_under_bf16_autocast_is_within_bf16_of_float64(family, device):
    """The families above under bf16 autocast (fp32 weights, the model's residual stream fp32), against the model in
    float64: the loss within 1e-3 on the Triton path, and the logits and each trainable parameter's gradient at most
    2x the reference path's error under the same autocast (FlashAttention's rule, as the GPT-2 test above: a
    gradient that sums many bf16 products is a few 1e-2 off on either path, 4.4e-2 on the reference one). The logits
    too: what bf16 costs them depends on the family, 2.4e-3 (BLOOM) to 1.0e-2 (Gemma 2's reference path), so a flat
    1e-2 was a fit (Gemma 2's 8.6e-3 at this seed, 9.5e-3 at worst over 46) that another seed, CPU or a GPU's
    kernels may cross. Measured: the logits' ratio to the reference path's at most 1.03 (6 seeds a family, 46 for
    Gemma 2), loss <= 1.9e-4 and the gradients' ratio <= 1.74 (12 seeds). The Triton path runs its kernels
    (counted) under autocast."""
    kw = FAMILIES[family]
    model, model64, idx, targets = _family_case(kw, family, device)
    got = {}
    for path in ("reference", "triton"):
        with CountOps() as mode, torch.autocast(device.type, dtype=torch.bfloat16):
            got[path] = _loss_and_grads(model.set_kernels(path), idx, targets)
    model.set_kernels("reference")
    assert mode.ops["flash_attn_bwd"] == model.config.n_layer, dict(mode.ops)
    want = _loss_and_grads(model64, idx, targets)
    logits, loss, grads = got["triton"]
    ref_err = report(got["reference"][0], want[0])[1]
    assert_close_rel(logits, want[0], 2 * ref_err, f"triton logits vs float64 (reference path's {ref_err:.1e})")
    assert_close_rel(loss, want[1], 1e-3, "triton loss vs float64")
    for name, g in want[2].items():
        if name.endswith("W_key.bias") and kw.get("position_encoding") != "rope":
            continue  # 0 in exact arithmetic (see above): rounding only, on both paths
        assert grads[name].dtype == torch.float32, name
        ref_err = report(got["reference"][2][name], g)[1]
        assert_close_rel(grads[name], g, 2 * ref_err, f"grad {name} (reference path's bf16 error {ref_err:.1e})")


class _KernelMask(torch.nn.Module):
    """An attention's dropout on the reference path that drops what the kernel drops: the keep-mask of the next seed
    (dropout_mask rebuilds flash_attention's), scaled by 1 / (1 - p) as nn.Dropout. p is read by the Triton path."""

    def __init__(self, p, seeds):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, weights):
        from tritongpt.kernels.attention import dropout_mask

        B, H, Tq, Tk = weights.shape
        keep = dropout_mask(next(self.seeds), B, H, Tq, Tk, self.p, weights.device)
        return weights * keep.to(weights.dtype) / (1 - self.p)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_with_dropout_matches_the_reference_given_the_kernels_masks(family, device, monkeypatch):
    """Dropout 0.2 everywhere (embeddings, attention weights, residual, MLP), in training: the kernel draws its
    attention mask from a seed, the reference from nn.Dropout, so the paths never agree as they stand. Here each
    flash_attention call gets the next of a fixed list of seeds (it draws nothing from torch's generator then) and
    the reference's attention dropout is _KernelMask on the same seeds; torch.manual_seed makes the other dropouts'
    masks the same on both paths. Then logits, loss and every gradient agree as without dropout (measured: <= 6e-7
    relative on every family, against dropout's own change of the logits, 0.38 to 0.94), through the options each
    family adds (window, soft cap, ALiBi, GQA, MoE, LoRA) and the kernel's backward, which redraws the mask."""
    import tritongpt.kernels.attention as attention

    p = 0.2
    model = _family_model({**FAMILIES[family], "dropout": p}, seed=len(family)).to(device).train()
    idx = torch.randint(0, 67, (2, 19), device=device)
    targets = torch.randint(0, 67, (2, 19), device=device)
    targets[1, :3] = -100
    real, got = attention.flash_attention, {}

    def seeded(q, k, v, *args, dropout_p=0.0, seed=None, **kw):
        assert dropout_p == p and seed is None  # the model's rate, and its seed left to the kernel
        drawn.append(next(seeds))
        return real(q, k, v, *args, dropout_p=dropout_p, seed=drawn[-1], **kw)
    monkeypatch.setattr(attention, "flash_attention", seeded)
    for path in ("reference", "triton"):
        seeds, drawn = iter(range(100, 200)), []
        for block in model.trf_blocks:
            block.att.attn_drop = _KernelMask(p, seeds)
        torch.manual_seed(7)
        got[path] = _loss_and_grads(model.set_kernels(path), idx, targets)
    model.set_kernels("reference")
    assert len(drawn) == 2 * model.config.n_layer  # _loss_and_grads' two forwards on the Triton path
    with torch.no_grad():
        plain = model.eval()(idx)
    assert report(got["reference"][0], plain)[1] > 0.1  # dropout is on, and changes the logits
    (logits, loss, grads), ref = got["triton"], got["reference"]
    assert_close_rel(logits, ref[0], 1e-4, "logits")
    assert_close_rel(loss, ref[1], 1e-5, "loss")
    for name, g in ref[2].items():
        if name.endswith("W_key.bias") and FAMILIES[family].get("position_encoding") != "rope":
            assert g.abs().max() < 1e-6 and grads[name].abs().max() < 1e-6, name  # 0 in exact arithmetic
            continue
        assert_close_rel(grads[name], g, 1e-4, f"grad {name}")
