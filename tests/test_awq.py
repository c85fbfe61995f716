"""AWQ (model/quant.py: quantize_awq, _awq_fold, _awq_search, _awq_clip; `tritongpt quantize --method awq`, whose
command tests are test_gptq.py's, beside GPTQ's): the folded scales leave the float model's function as it was, the
scaled stages round with less output error than round-to-nearest (much less where a few channels are salient), the
clip search, q and k left unclipped, and the refusals."""
import copy

import pytest
import torch
from torch import nn

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.quant import (AWQ_NO_CLIP, Int4Linear, _awq_clip, dequantize_int4, quantize, quantize_awq,
                                   quantize_weight_int4)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two threads spin against each other

V, T = 64, 32
FAMILIES = {
    "gpt2": dict(),
    # RMSNorm, SwiGLU, RoPE and GQA (2 KV heads for 4 query heads: a value channel read by two heads' channels)
    "llama": dict(norm="rmsnorm", mlp="swiglu", position_encoding="rope", bias=False, n_kv_head=2, tie_weights=False,
                  mlp_hidden=96),
}
# where each stage's scale folds, found by what the block computes: GPT-2's fc2 reads a GELU's output (none)
FOLDS = {"gpt2": ["norm1", "att.W_value", "norm2", None], "llama": ["norm1", "att.W_value", "norm2", "ff.w_up"]}


def tiny(family, salient=False, seed=0):
    """A 2-layer, 64-wide model of the family, its norms and biases off their ones and zeros. salient: in every
    block 4 channels of each input norm's output 10x larger and the matching columns of the Linears that read them
    10x smaller (the same function): the few large-activation channels AWQ exists for, whose small weights
    round-to-nearest rounds coarsely for their size."""
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=2, n_head=4, n_embd=64,
                               **FAMILIES[family])).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if salient:
            for block in model.trf_blocks:
                up = [block.ff.fc1] if family == "gpt2" else [block.ff.w_gate, block.ff.w_up]
                for norm, linears in ((block.norm1, [block.att.W_query, block.att.W_key, block.att.W_value]),
                                      (block.norm2, up)):
                    idx = torch.randperm(64, generator=g)[:4]
                    for p in (norm.weight, getattr(norm, "bias", None)):
                        if p is not None:
                            p[idx] *= 10
                    for linear in linears:
                        linear.weight[:, idx] /= 10
    return model


def calibration(n=6, seed=0):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_folded_scales_alone_leave_the_float64_models_logits_as_they_were(family):
    """The scales folded (fold_only: nothing rounded or clipped) into the norms, the value rows (GQA's: one scale a
    KV channel) and SwiGLU's up rows: the logits within float64 rounding of the original's, while the weights did
    move (a search that picked s = 1 everywhere, or a fold into the wrong channels, would fail one or the other)."""
    model = tiny(family).double()
    report = {}
    folded = quantize_awq(copy.deepcopy(model), "int4", calibration(), group_size=32, batch_size=4, report=report,
                          fold_only=True)
    assert not getattr(folded, "quantized", None)
    assert [s["fold"] for s in report["stages"]] == FOLDS[family] * 2
    assert report["unscaled"] == (["trf_blocks.0.ff.fc2", "trf_blocks.1.ff.fc2"] if family == "gpt2" else [])
    assert any(s.get("alpha", 0) > 0 for s in report["stages"])
    moved = [float((a - b).abs().max()) for a, b in zip(folded.state_dict().values(), model.state_dict().values())]
    assert max(moved) > 1e-3
    ids = calibration(3, seed=1)
    with torch.no_grad():
        want, got = model(ids), folded(ids)
    rel = float((got - want).norm() / want.norm())
    print(f"{family}: folded logits {rel:.1e} from the original's (relative, float64)")
    assert rel < 1e-12


def stage_inputs(model, names, ids):
    """{name: the [tokens, K] input of the named Linear (block.name) of each block} as model runs on ids."""
    xs = {}

    def keep(key):
        def hook(module, args):
            xs[key] = args[0].reshape(-1, module.in_features).double()
        return hook

    hooks = [block.get_submodule(name).register_forward_pre_hook(keep((b, name)))
             for b, block in enumerate(model.trf_blocks) for name in names]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return xs


def rounded(w, group=32):
    return dequantize_int4(*quantize_weight_int4(w, group), group).double()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_scaled_stage_rounds_with_no_more_output_error_than_round_to_nearest_and_far_less_where_salient(family):
    """AWQ's own objective, recomputed here in float64 from the two models: a stage's outputs with its weights W s
    rounded, read by x / s (the folded model's), against the float model's x W^T; round-to-nearest's, W rounded
    read by x. A later stage's fold may divide a stage's rows too (the value rows, SwiGLU's up rows: their
    outputs d times smaller, each row's d read off the two float models' outputs), which a row's own groups follow
    exactly: those outputs are compared d times larger. Never worse on any stage (alpha 0 is round-to-nearest); on
    the salient model, whose rounding error sits in the large channels' small weights, the scales cut it
    several times."""
    names = {"gpt2": [["att.W_query", "att.W_key", "att.W_value"], ["att.out_proj"], ["ff.fc1"]],
             "llama": [["att.W_query", "att.W_key", "att.W_value"], ["att.out_proj"], ["ff.w_gate", "ff.w_up"],
                       ["ff.w_down"]]}[family]
    for salient in (False, True):
        model, ids = tiny(family, salient), calibration()
        folded = quantize_awq(copy.deepcopy(model), "int4", ids, group_size=32, batch_size=3, fold_only=True)
        x, xs = stage_inputs(model, [s[0] for s in names], ids), stage_inputs(folded, [s[0] for s in names], ids)
        totals = [0.0, 0.0]
        for b in range(2):
            for stage in names:
                W = torch.cat([model.trf_blocks[b].get_submodule(n).weight.detach().double() for n in stage])
                Ws = torch.cat([folded.trf_blocks[b].get_submodule(n).weight.detach().double() for n in stage])
                X, Xs = x[b, stage[0]], xs[b, stage[0]]
                want, scaled = X @ W.T, Xs @ Ws.T
                d = (scaled * want).sum(0) / (want * want).sum(0)  # each output row's factor, 1 where none came
                assert float((scaled - want * d).norm() / want.norm()) < 1e-5  # (the fp32 model's fold)
                rtn = float((X @ rounded(W).T - want).pow(2).mean())
                awq = float((Xs @ rounded(Ws).T / d - want).pow(2).mean())
                assert awq <= rtn * (1 + 1e-5), (salient, b, stage)
                totals[0] += rtn
                totals[1] += awq
        print(f"{family}, salient {salient}: stage output error RTN {totals[0]:.3e}, AWQ {totals[1]:.3e} "
              f"({totals[1] / totals[0]:.2f}x)")
        assert totals[1] < (0.3 if salient else 1.0) * totals[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_an_awq_model_is_nearer_its_float_self_than_round_to_nearest_where_a_few_channels_are_salient(family):
    """The whole method (scales, clipping, rounding; the head rounded to nearest as quantize's): the logits' distance
    from the float model's on held-out ids about half round-to-nearest's at G 32 (0.19 against 0.42 GPT-2, 0.22
    against 0.42 Llama). q and k are rounded from the folded weights unclipped (as AutoAWQ), the others clipped."""
    model, ids = tiny(family, salient=True), calibration(3, seed=1)
    rtn = quantize(copy.deepcopy(model), "int4", group_size=32)
    awq = quantize(copy.deepcopy(model), "int4", group_size=32, method="awq", calibration=calibration())
    assert (awq.quantized, awq.quantized_linears, awq.quantized_group_size) == ("int4", rtn.quantized_linears, 32)
    with torch.no_grad():
        want = model(ids)
        e_rtn, e_awq = (float((m(ids) - want).norm() / want.norm()) for m in (rtn, awq))
    print(f"{family}: logits' distance from the float model's RTN {e_rtn:.4f}, AWQ {e_awq:.4f}")
    assert e_awq < 0.7 * e_rtn
    folded = quantize_awq(copy.deepcopy(model), "int4", calibration(), group_size=32, fold_only=True)
    for b in range(2):
        for name, m in awq.trf_blocks[b].named_modules():
            if isinstance(m, Int4Linear):
                plain = quantize_weight_int4(folded.trf_blocks[b].get_submodule(name).weight, 32)[0]
                assert torch.equal(m.qweight, plain) == (name in AWQ_NO_CLIP), name


def test_a_norm_read_twice_takes_no_scale_for_either_reading(monkeypatch):
    """A parallel block that calls its one norm twice, attention and MLP each on a call of its own (two tensors,
    so two stages, each linear in the norm's channels): a scale folded into the norm for one stage would divide
    the other's input too. Both are refused (the fold's check on the block's output, not the linearity alone), the
    float64 logits as they were; the value rows still fold."""
    from tritongpt.model.layers import TransformerBlock

    def twice(self, x, cache=None, doc_ids=None, mlp_out=None, positions=None, rope_len=None):
        x = x if mlp_out is None else x + mlp_out
        att_out = self.att(self.norm1(x), cache, doc_ids, positions, rope_len)
        return x, self._scaled(att_out + self.ff(self.norm1(x)))

    monkeypatch.setattr(TransformerBlock, "parallel_forward", twice)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64, **FAMILIES["llama"],
                               parallel_residual=True, shared_norm=True)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    report = {}
    folded = quantize_awq(copy.deepcopy(model), "int4", calibration(2), group_size=32, report=report, fold_only=True)
    assert [s["fold"] for s in report["stages"]] == [None, "att.W_value", None, "ff.w_up"]
    ids = calibration(2, seed=1)
    with torch.no_grad():
        want = model(ids)
        assert float((folded(ids) - want).norm() / want.norm()) < 1e-12


def awq_scales(x, cmap, M: int, alpha: float):
    """AWQ's scale (Lin et al. 2023), written out: each channel's mean |x| over the tokens (x [tokens, K]), under
    GQA averaged over the query-head channels that read one KV channel (cmap [K] -> M channels), to the alpha,
    clamped at 1e-4 and normalised by sqrt(max min): t [M], float64."""
    x_mean = torch.zeros(M, dtype=torch.float64).index_add_(0, cmap, x.abs().mean(0)) / torch.bincount(cmap)
    t = x_mean.pow(alpha).clamp(min=1e-4)
    return t / (t.max() * t.min()).sqrt()


def test_each_stage_s_scale_is_the_papers_formula_at_the_alpha_whose_output_error_is_least():
    """Block 0 of the salient GQA model, each stage against a plain float64 oracle: for every alpha of the grid,
    the stage's weights times s = t[cmap] rounded, divided by s, and the mean square of its outputs' change over
    the calibration tokens (x D^T, not through X^T X). The alpha chosen is the oracle's best, its error and
    round-to-nearest's (alpha 0) as reported, and the scale folded into the model (the norms' weights, the value
    rows, the up rows) is t at that alpha, one a KV channel for the output projection's 64 inputs."""
    model, ids = tiny("llama", salient=True), calibration()
    report = {}
    folded = quantize_awq(copy.deepcopy(model), "int4", ids, group_size=32, batch_size=3, report=report,
                          fold_only=True)
    stages = [s for s in report["stages"] if s["block"] == 0]
    assert [s["stage"] for s in stages] == [["att.W_query", "att.W_key", "att.W_value"], ["att.out_proj"],
                                            ["ff.w_gate", "ff.w_up"], ["ff.w_down"]]
    xs = stage_inputs(model, [s["stage"][0] for s in stages], ids)
    old, new = model.trf_blocks[0], folded.trf_blocks[0]
    kv = (torch.arange(64) // 16 // 2) * 16 + torch.arange(64) % 16  # query head h's dim d reads KV head h // 2's
    cmaps = [torch.arange(64), kv, torch.arange(64), torch.arange(96)]
    w = {n: old.get_submodule(n).weight.detach() for n in ("att.W_value", "ff.w_up")}
    t_qkv = old.norm1.weight.detach().double() / new.norm1.weight.detach().double()
    t_up = old.norm2.weight.detach().double() / new.norm2.weight.detach().double()
    applied = [t_qkv,  # each folded row: the original's times its column scales, divided by the row's own scale
               (w["att.W_value"] * t_qkv.float()).double().norm(dim=1) / new.att.W_value.weight.double().norm(dim=1),
               t_up, (w["ff.w_up"] * t_up.float()).double().norm(dim=1) / new.ff.w_up.weight.double().norm(dim=1)]
    for said, cmap, t in zip(stages, cmaps, applied):
        X = xs[0, said["stage"][0]]
        W = torch.cat([old.get_submodule(n).weight.detach() for n in said["stage"]])
        errors = []
        for i in range(20):
            s = awq_scales(X, cmap, len(t), i / 20)[cmap].float()
            errors.append(float((X @ (rounded(W * s) / s.double() - W.double()).T).pow(2).mean()))
        chosen = round(said["alpha"] * 20)
        assert said["error"] == pytest.approx(errors[chosen], rel=1e-4), said["stage"]
        assert said["rtn_error"] == pytest.approx(errors[0], rel=1e-4), said["stage"]
        assert errors[chosen] <= min(errors) * (1 + 1e-4), (said["stage"], chosen, errors)
        torch.testing.assert_close(t, awq_scales(X, cmap, len(t), said["alpha"]), rtol=1e-5, atol=0)
    assert any(s["alpha"] > 0 for s in stages)


def test_the_clip_search_shrinks_a_group_with_an_outlier_and_never_raises_a_groups_output_error():
    """auto_clip on groups whose largest weight is 6x the rest's spread: those groups' ranges shrink, each
    row-group's share of the outputs is no further from the float's than round-to-nearest's, and the whole
    layer's output error drops (a little: on isotropic inputs an outlier weight matters as much as it is large)."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 64, generator=g), torch.randn(200, 64, generator=g)
    W[torch.arange(24), torch.randint(0, 64, (24,), generator=g)] *= 6
    keep = _awq_clip(W, X.double().T @ X.double() / len(X), 16)
    amax = W.view(24, 4, 16).abs().amax(-1)
    assert keep.shape == (24, 4) and bool((keep <= amax).all()) and bool((keep >= 0.5 * amax - 1e-6).all())
    assert float((keep < amax).float().mean()) > 0.3
    clipped = torch.clamp(W.view(24, 4, 16), -keep[..., None], keep[..., None]).view(24, 64)

    def group_errors(w):
        d = (rounded(w, 16) - W.double()).view(24, 4, 16)
        return torch.einsum("ngk,tgk->ngt", d, X.double().view(-1, 4, 16)).pow(2).mean(-1)

    assert bool((group_errors(clipped) <= group_errors(W) * (1 + 1e-5)).all())
    err = [float((X.double() @ (rounded(w, 16) - W.double()).T).norm()) for w in (W, clipped)]
    print(f"layer output error RTN {err[0]:.2f}, clipped {err[1]:.2f}")
    assert err[1] < err[0]


def test_awq_refuses_what_it_does_not_do_by_name_and_a_refusal_midway_leaves_the_float_model(monkeypatch):
    model, ids = tiny("llama"), calibration(2)
    for kw, said in ((dict(mode="int8"), "AWQ quantizes to int4 here"),
                     (dict(act_order=True), "act-order is GPTQ's: AWQ scales and clips"),
                     (dict(true_sequential=True), "true sequential is GPTQ's: AWQ"),
                     (dict(calibration=None), "AWQ needs calibration token ids"),
                     (dict(calibration=ids.float()), "AWQ's calibration must be token ids"),
                     (dict(calibration=torch.zeros(1, T + 1, dtype=torch.long)), "longer than the model's context"),
                     (dict(group_size=128), "in_features a multiple of it")):
        with pytest.raises(UserError, match=said):
            quantize(model, **{"mode": "int4", "group_size": 32, "method": "awq", "calibration": ids, **kw})
    for method, kw in (("rtn", {}), ("gptq", dict(calibration=ids))):  # a report only AWQ fills: never left empty
        with pytest.raises(UserError, match=f"report= is AWQ's .*: method '{method}' fills none"):
            quantize(model, "int4", group_size=32, method=method, report={}, **kw)
    moe = GPTModel(GPTConfig(vocab_size=V, context_length=T, n_layer=1, n_head=4, n_embd=64, **FAMILIES["llama"],
                             n_experts=4, experts_per_token=2))
    with pytest.raises(UserError, match="does not take mixture-of-experts models"):
        quantize(moe, "int4", group_size=32, method="awq", calibration=ids)
    # the fifth matrix refused (block 0's, after its norms and value rows took their scales and every matrix its
    # clip): every weight of the float model as it was, nothing swapped
    before = copy.deepcopy(model.state_dict())
    real, calls = Int4Linear.from_linear, []

    def fail_on_fifth(linear, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise UserError("no")
        return real(linear, *a, **k)

    monkeypatch.setattr(Int4Linear, "from_linear", fail_on_fifth)
    with pytest.raises(UserError, match="trf_blocks.0.ff.w_gate: no"):
        quantize(model, "int4", group_size=32, method="awq", calibration=ids)
    assert getattr(model, "quantized", None) is None and model.training is False
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.trf_blocks[0].ff.w_gate, nn.Linear)


def test_a_block_with_a_matrix_it_never_calls_is_refused_as_awqs_and_the_blocks_before_it_put_back():
    """The second block holds a Linear its forward never calls: the refusal names AWQ (not GPTQ, whose stage
    finder it shares) and comes after the first block was scaled, clipped and swapped: all of it undone."""
    model = tiny("llama")
    model.trf_blocks[1].unused = nn.Linear(64, 64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match="^AWQ cannot calibrate unused: the block never calls it"):
        quantize(model, "int4", group_size=32, method="awq", calibration=calibration(2))
    assert not any(isinstance(m, Int4Linear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
