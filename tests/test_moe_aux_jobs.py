"""A mixture of experts' load-balancing loss in the fine-tuning jobs' objectives.

GPTModel.forward adds GPTConfig.moe_aux_loss * router_aux_loss() to a mean LM loss only; the jobs that score
their batches otherwise (sft's (sum, count), DPO's and KTO's log-probs, the reward model's scores) add it
themselves (common.moe_aux_term), once per micro-batch, over the policy's own forward. Each test here compares a
job's loss and gradients against the same job at coefficient 0 plus coef * the routers' aux of that forward.
"""
import copy
from types import SimpleNamespace

import pytest
import torch

from test_grad_accum_jobs import (CTX, VOCAB, assert_accumulation_is_one_batch, ids, one_step, pairs, sft_batches,
                                  sft_examples)
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train import common, distill, dpo, kto, reward, sft
from tritongpt.train.preference import EncodedPair, pair_batch, sequence_logprobs

COEF = 0.7  # large, so that a missing or misweighted term shows well above float noise
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_moe(seed, coef=COEF):
    torch.manual_seed(seed)
    m = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=16, n_layer=1, n_head=2, mlp="swiglu",
                           mlp_hidden=16, n_experts=4, experts_per_token=2, moe_aux_loss=coef))
    with torch.no_grad():  # uneven routing: an aux loss well away from its balanced value
        for b in m.trf_blocks:
            b.ff.router.weight.normal_(0, 1.0)
    return m


def grads(loss, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def real(lengths, T):
    """[B, T] true at a right-padded batch's first lengths[b] tokens: the tokens the aux counts."""
    return torch.arange(T) < torch.as_tensor(lengths).unsqueeze(1)


def sft_real(seed, rows=slice(None)):
    """sft_batches(seed)'s real input tokens (collate's rows, each len(ids) - 1 long, then padding)."""
    lengths = [len(e.ids) - 1 for e in sft_examples(seed)[rows]]
    return real(lengths, max(lengths))


def assert_adds_aux(loss_fn, model, batch, policy_forward, scale=lambda out: 1.0, mask=None):
    """loss_fn(model, batch) at COEF is the loss at coefficient 0 plus COEF * the aux of policy_forward(model)'s
    routers over mask's tokens (a padded batch's real ones; times scale(output) for a sum), in value and in every
    gradient."""
    inner = getattr(model, "backbone", getattr(model, "policy", model))  # a reward model, rlhf's PolicyWithValue
    inner.config.moe_aux_loss = 0.0
    base = loss_fn(model, batch)
    policy_forward(model)
    aux = inner.router_aux_loss(mask)
    assert mask is None or not mask.all()  # padding the aux leaves out
    inner.config.moe_aux_loss = COEF
    got = loss_fn(model, batch)
    b, g = (base[0], got[0]) if isinstance(got, tuple) else (base, got)
    if isinstance(got, tuple):
        assert torch.equal(got[1], base[1])  # the count is the count
    want = b + COEF * aux * scale(got)
    assert (COEF * aux * scale(got)).item() > 1e-2 * abs(b.item())  # a term the comparison can see
    torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6)
    for x, y in zip(grads(g, model), grads(want, model)):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # sums: gradients of order 1


# -- sft ----------------------------------------------------------------------------------------------------
def test_sft_loss_adds_the_aux_once_per_counted_target():
    _, full = sft_batches(1)
    assert_adds_aux(sft.sft_loss, tiny_moe(0), full, lambda m: m(full[0]), scale=lambda out: out[1],
                    mask=sft_real(1))


def test_sft_step_logs_and_trains_on_the_mean_plus_the_aux(tmp_path):
    """Through the Trainer: the step's loss is the token mean plus COEF * aux (not aux times the count, nor aux
    over the count), and with two micro-batches each one's aux weighs its share of the step's counted targets."""
    micro, full = sft_batches(1)
    model = tiny_moe(0)
    row, _ = one_step(copy.deepcopy(model), sft.sft_loss, [full], tmp_path / "one")
    m = copy.deepcopy(model)
    x, y = full
    m.config.moe_aux_loss = 0.0
    ce = m(x, targets=y, ignore_index=sft.IGNORE_INDEX)  # forward's mean, plus the aux of the real tokens
    assert row["loss"] == pytest.approx(ce.item() + COEF * m.router_aux_loss(sft_real(1)).item(), rel=1e-5)

    row, g = one_step(copy.deepcopy(model), sft.sft_loss, micro, tmp_path / "two")
    m = copy.deepcopy(model)
    total, n = 0.0, sum(int((t != sft.IGNORE_INDEX).sum()) for _, t in micro)
    for (x, y), rows in zip(micro, (slice(0, 2), slice(2, 4))):
        s = m(x, targets=y, ignore_index=sft.IGNORE_INDEX, reduction="sum")
        total = total + s + COEF * m.router_aux_loss(sft_real(1, rows)) * (y != sft.IGNORE_INDEX).sum()
    (total / n).backward()
    assert row["loss"] == pytest.approx((total / n).item(), rel=1e-5)
    for name, p in m.named_parameters():
        torch.testing.assert_close(g[name], p.grad, rtol=1e-4, atol=1e-5)


def test_sft_with_a_teacher_adds_the_students_aux_not_the_teachers():
    _, full = sft_batches(3)
    opts = {"distill_alpha": 0.6, "distill_temperature": 1.5, "distill_beta": 0.3}
    fn = distill.sft_loss_fn(tiny_moe(1), opts, VOCAB, sft.IGNORE_INDEX)
    assert_adds_aux(fn, tiny_moe(0), full, lambda m: m(full[0]), scale=lambda out: out[1], mask=sft_real(3))


def cut_in_a_user_turn(seed):
    """A chat cut by --max-length in a later user turn (its last 4 tokens a context range: real tokens, their
    targets ignored), then a whole example: a batch whose first row ends in ignored targets."""
    g = torch.Generator().manual_seed(seed)
    return [sft.Example(ids=ids(g, 14), prompt_len=3, context=((10, 14),)), sft.Example(ids=ids(g, 6), prompt_len=2)]


@pytest.mark.parametrize("job", ["sft", "sft_packed", "gkd"])
def test_sft_counts_the_real_tokens_whose_targets_are_ignored(job):
    """The aux is over every real token of the batch, a cut chat's trailing user-turn tokens too (their targets
    are ignored, but the model routed them): not only through each row's last counted target."""
    ex = cut_in_a_user_turn(4)
    if job == "sft_packed":
        batch = sft.collate_packed([[ex[1], ex[0]], [ex[1]]], row_len=CTX, pad_id=0, lengths=True)
        want = real([18, 5], CTX)
    else:
        batch = sft.collate(ex, pad_id=0, lengths=True)
        want = real([13, 5], 13)
    assert torch.equal(batch[3], want.sum(1))
    assert not torch.equal(common.through_last_mask(batch[1] != sft.IGNORE_INDEX), want)  # the cut row's tail
    fn = sft.sft_loss if job != "gkd" else distill.sft_loss_fn(
        tiny_moe(1), {"distill_alpha": 0.6, "distill_temperature": 1.5, "distill_beta": 0.3}, VOCAB, sft.IGNORE_INDEX)
    doc_ids = batch[2]
    assert_adds_aux(fn, tiny_moe(0), batch, lambda m: m(batch[0], doc_ids=doc_ids), scale=lambda out: out[1],
                    mask=want)


def test_sft_data_batches_carry_their_rows_lengths():
    """SFTData's training batches (and so GKD's) carry each row's real tokens, packed or not, for the aux."""
    ex = cut_in_a_user_turn(4) + sft_examples(1)
    for pack in (None, CTX):
        data = sft.SFTData(ex, [], pad_id=0, batch_size=2, seed=0, rank=0, world_size=1, pack_len=pack)
        batch = data.get_batch("train")
        assert len(batch) == 4 and (batch[2] is None) == (pack is None)
        real_tokens = batch[3].sum().item()
        took = data._order[data.pos - 1]
        rows = [[ex[i] for i in row] for row in took] if pack else [[ex[i]] for i in took]
        assert real_tokens == sum(len(e.ids) - 1 for row in rows for e in row)


def test_sft_with_no_coefficient_is_the_plain_sum():
    _, full = sft_batches(2)
    m = tiny_moe(0, coef=0.0)
    s, n = sft.sft_loss(m, full)
    assert torch.equal(s, m(full[0], targets=full[1], ignore_index=sft.IGNORE_INDEX, reduction="sum"))
    dense = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=16, n_layer=1, n_head=2))
    s, n = sft.sft_loss(dense, full)
    assert torch.equal(s, dense(full[0], targets=full[1], ignore_index=sft.IGNORE_INDEX, reduction="sum"))


# -- preference jobs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "orpo"])
def test_dpo_adds_the_policys_aux(loss_type):
    enc = pairs(5)
    ref = None
    if loss_type not in dpo.REFERENCE_FREE:
        ref = dpo.reference_logprobs(tiny_moe(1), enc, 0, "cpu", mean=loss_type in dpo.PER_TOKEN)
    batch = dpo.DPOData(enc, ref, pad_id=0).batch(range(4))
    idx, mask = batch[:2]
    fn = dpo.make_loss_fn(0.5, loss_type)
    lengths = pair_batch(enc[:4], pad_id=0)[1]
    assert_adds_aux(fn, tiny_moe(0), batch, lambda m: sequence_logprobs(m, idx, mask),
                    mask=real(lengths, idx.size(1)))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_adds_the_completions_aux_not_the_kl_batchs(loss_type):
    g = torch.Generator().manual_seed(6)
    enc = [kto.EncodedExample(prompt=ids(g, p), completion=ids(g, c), label=label)
           for p, c, label in ((5, 2, True), (3, 3, False), (4, 9, False), (2, 7, True))]
    kl = loss_type == "kto"
    data = kto.cache_reference(tiny_moe(1), kto.KTOData(enc, chunk=4, max_len=CTX, pad_id=0), "cpu", kl=kl)
    batch = data.batch([0, 1, 2, 3], kl=kl)
    fn = kto.make_loss_fn(0.3, loss_type)
    lengths = [len(e.prompt) + len(e.completion) for e in enc]
    assert_adds_aux(fn, tiny_moe(0), batch, lambda m: sequence_logprobs(m, batch[0], batch[1]),
                    mask=real(lengths, batch[0].size(1)))


def test_dpo_and_kto_count_the_prompt_of_a_row_with_no_response_target():
    """A row whose response has no token (no target to score) still routed its prompt's tokens: they count in the
    aux, as every real token does (the rows' lengths, not the response mask's last target, mark the padding)."""
    g = torch.Generator().manual_seed(9)
    enc = [EncodedPair(prompt=ids(g, 6), chosen=ids(g, 3), rejected=[]),
           EncodedPair(prompt=ids(g, 4), chosen=ids(g, 5), rejected=ids(g, 2))]
    batch = dpo.DPOData(enc, dpo.reference_logprobs(tiny_moe(1), enc, 0, "cpu"), pad_id=0).batch([0, 1])
    lengths = [9, 9, 6, 6]
    assert torch.equal(batch[3], torch.tensor(lengths)) and not batch[1][2].any()  # row 2: no response target
    idx, mask = batch[:2]
    assert_adds_aux(dpo.make_loss_fn(0.5), tiny_moe(0), batch, lambda m: sequence_logprobs(m, idx, mask),
                    mask=real(lengths, idx.size(1)))

    ex = [kto.EncodedExample(prompt=ids(g, 5), completion=[], label=True),
          kto.EncodedExample(prompt=ids(g, 3), completion=ids(g, 4), label=False)]
    data = kto.cache_reference(tiny_moe(1), kto.KTOData(ex, chunk=2, max_len=CTX, pad_id=0), "cpu", kl=False)
    batch = data.batch([0, 1], kl=False)
    assert torch.equal(batch[7], torch.tensor([5, 7])) and not batch[1][0].any()
    assert_adds_aux(kto.make_loss_fn(0.3, "apo_zero_unpaired"), tiny_moe(0), batch,
                    lambda m: sequence_logprobs(m, batch[0], batch[1]), mask=real([5, 7], batch[0].size(1)))


def test_the_reward_model_adds_its_backbones_aux():
    enc = pairs(4, margins=True)
    idx, lengths, _ = pair_batch(enc, pad_id=0)
    model = reward.RewardModel(tiny_moe(0))
    fn = reward.make_reward_loss(center_rewards_coefficient=0.1)
    assert_adds_aux(fn, model, (idx, lengths, reward.pair_margins(enc)), lambda m: m(idx, lengths),
                    mask=real(lengths, idx.size(1)))


def test_dpo_accumulates_each_micro_batchs_aux_over_k(tmp_path):
    """--grad-accum 2: each micro-batch's loss, its aux included, / 2 (as pretrain's mean losses); the aux of two
    halves is not the whole batch's (a product of means), so only at coefficient 0 is it one batch."""
    enc = pairs(5)
    data = dpo.DPOData(enc, None, pad_id=0)
    fn = dpo.make_loss_fn(0.5, "simpo")
    micro = [data.batch([0, 1]), data.batch([2, 3])]
    row, g = one_step(tiny_moe(0), fn, micro, tmp_path / "two")
    m = tiny_moe(0)
    m.config.moe_aux_loss = 0.0
    total = 0.0
    for batch, rows in zip(micro, ([0, 1], [2, 3])):
        lengths = pair_batch([enc[i] for i in rows], pad_id=0)[1]
        total = total + (fn(m, batch) + COEF * m.router_aux_loss(real(lengths, batch[0].size(1)))) / 2
    total.backward()
    assert row["loss"] == pytest.approx(total.item(), rel=1e-5)
    for name, p in m.named_parameters():
        torch.testing.assert_close(g[name], p.grad, rtol=1e-4, atol=1e-6)


def test_at_coefficient_0_a_mixture_of_experts_accumulates_as_one_batch(tmp_path):
    micro, full = sft_batches(1)
    assert_accumulation_is_one_batch(tiny_moe(0, coef=0.0), sft.sft_loss, micro, full, tmp_path / "sft")
    data = dpo.DPOData(pairs(5), None, pad_id=0)
    assert_accumulation_is_one_batch(tiny_moe(0, coef=0.0), dpo.make_loss_fn(0.5, "simpo"),
                                     [data.batch([0, 1]), data.batch([2, 3])], data.batch(range(4)), tmp_path / "dpo")


# -- the moe_aux column ---------------------------------------------------------------------------------------
def test_the_step_logs_the_aux_it_trained_on(tmp_path):
    """moe_aux: what of the logged loss is the routers' balance, weighed as the loss is (sft's by counted targets
    over the micro-batches, a mean loss's by 1/k), so loss - moe_aux is the plain objective; no column for a
    dense model or a coefficient of 0."""
    ex = sft_examples(1)
    micro = [sft.collate(ex[:2], pad_id=0, lengths=True), sft.collate(ex[2:], pad_id=0, lengths=True)]
    row, _ = one_step(tiny_moe(0), sft.sft_loss, micro, tmp_path / "sft")
    m = tiny_moe(0)
    aux = plain = 0.0
    for x, y, _, lengths in micro:
        n = (y != sft.IGNORE_INDEX).sum().item()
        m.config.moe_aux_loss = 0.0
        plain += sft.sft_loss(m, (x, y))[0].item()
        aux += COEF * m.router_aux_loss(real(lengths, x.size(1))).item() * n
    n = sum((y != sft.IGNORE_INDEX).sum().item() for _, y, *_ in micro)
    assert row["moe_aux"] == pytest.approx(aux / n, rel=1e-5) and row["moe_aux"] > 0.1
    assert row["loss"] - row["moe_aux"] == pytest.approx(plain / n, rel=1e-5)

    data = dpo.DPOData(pairs(5), None, pad_id=0)
    micro = [data.batch([0, 1]), data.batch([2, 3])]
    row, _ = one_step(tiny_moe(0), dpo.make_loss_fn(0.5, "simpo"), list(micro), tmp_path / "dpo")
    m = tiny_moe(0)
    want = 0.0
    for batch in micro:
        dpo.make_loss_fn(0.5, "simpo")(m, batch)
        want += common.take_moe_aux(m).item() / 2
    assert row["moe_aux"] == pytest.approx(want, rel=1e-5)

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (2, CTX + 1), generator=g)
    batch = (x[:, :-1], x[:, 1:])
    row, _ = one_step(tiny_moe(0), lambda m, b: m(b[0], targets=b[1]), [batch], tmp_path / "pretrain")
    m = tiny_moe(0)
    m(batch[0])
    assert row["moe_aux"] == pytest.approx(COEF * m.router_aux_loss().item(), rel=1e-5)

    dense = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=16, n_layer=1, n_head=2))
    for i, model in enumerate((tiny_moe(0, coef=0.0), dense)):
        row, _ = one_step(model, sft.sft_loss, [sft.collate(ex, pad_id=0, lengths=True)], tmp_path / f"none{i}")
        assert "moe_aux" not in row and row["loss"] > 0


def column_jobs():
    """(loss_fn, two micro-batches, model maker) of the jobs the test above leaves out: uneven micro-batches each
    (packed rows counting 5 and 54 targets, short and long pairs), so a misweighed aux shows."""
    ex = sft_examples(1)
    opts = {"distill_alpha": 0.6, "distill_temperature": 1.5, "distill_beta": 0.3}
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, VOCAB, (4, 12), generator=g), torch.randint(0, VOCAB, (4, 12), generator=g)
    windows = [(x[:2], y[:2]), (x[2:], y[2:])]
    enc = pairs(4, margins=True)
    kx = [kto.EncodedExample(p.prompt, p.chosen, i % 2 == 0) for i, p in enumerate(enc)]
    data = kto.KTOData(kx, chunk=4, max_len=CTX, pad_id=0)
    data.ref_logp, data.ref_kl_logp = torch.linspace(-9, -3, 4), torch.linspace(-8, -2, 4)

    def pair_rows(chunk):
        idx, lengths, _ = pair_batch(chunk, pad_id=0)
        return idx, lengths, reward.pair_margins(chunk)

    return {
        "sft_packed": (sft.sft_loss, [sft.collate_packed([ex[:2]], CTX, 0, lengths=True),
                                      sft.collate_packed([ex[2:3], ex[3:]], CTX, 0, lengths=True)], tiny_moe),
        "gkd": (distill.sft_loss_fn(tiny_moe(1), opts, VOCAB, sft.IGNORE_INDEX),
                [sft.collate(ex[:2], 0, lengths=True), sft.collate(ex[2:], 0, lengths=True)], tiny_moe),
        "pretrain": (lambda m, b: m(b[0], targets=b[1]), windows, tiny_moe),
        "pretrain_teacher": (distill.pretrain_loss_fn(tiny_moe(1), opts, VOCAB, lambda x: None), windows, tiny_moe),
        "kto": (kto.make_loss_fn(0.3, "kto"), [data.batch([0, 1]), data.batch([2, 3])], tiny_moe),
        "reward": (reward.make_reward_loss(0.1), [pair_rows(enc[:2]), pair_rows(enc[2:])],
                   lambda seed, coef=COEF: reward.RewardModel(tiny_moe(seed, coef))),
    }


@pytest.mark.parametrize("job", ["sft_packed", "gkd", "pretrain", "pretrain_teacher", "kto", "reward"])
def test_loss_minus_the_column_is_the_step_at_coefficient_0(job, tmp_path):
    """Over two micro-batches: moe_aux is exactly what of the logged loss the aux is, weighed as the loss is (by
    counted targets for a (sum, count) loss, 1/k for a mean), so loss - moe_aux is the same step's loss at
    coefficient 0 (the routing, and so the plain objective, does not depend on the coefficient)."""
    fn, micro, make = column_jobs()[job]
    row, _ = one_step(make(0), fn, copy.deepcopy(micro), tmp_path / "moe")
    plain, _ = one_step(make(0, coef=0.0), fn, copy.deepcopy(micro), tmp_path / "plain")
    assert "moe_aux" not in plain and row["moe_aux"] > 0.1
    assert row["loss"] - row["moe_aux"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("job", ["sft", "dpo"])
def test_a_run_writes_moe_aux_to_its_metrics_for_a_mixture_of_experts_only(job, tmp_path):
    """Through the jobs' own training functions, one step each: metrics.jsonl has the column for a mixture of
    experts at a non-zero coefficient, and none for a dense model."""
    import json

    from test_sft import CharTokenizer, train_args

    from tritongpt.train.preference import PreferencePair

    def model(moe):
        torch.manual_seed(0)
        extra = dict(mlp="swiglu", mlp_hidden=16, n_experts=4, experts_per_token=2, moe_aux_loss=COEF) if moe else {}
        return GPTModel(GPTConfig(vocab_size=129, context_length=32, n_embd=16, n_layer=1, n_head=2, **extra))

    for moe in (True, False):
        out = tmp_path / f"{job}_{moe}"
        args = train_args(out, max_steps=1, batch_size=2)
        if job == "sft":
            recs = [{"instruction": f"w{i}", "input": "", "output": "ab"} for i in range(4)]
            sft.run_sft(model(moe), CharTokenizer(), recs, [], [], args, sample=False, eval_gen=0,
                        template=lambda r: r["instruction"])
        else:
            ps = [PreferencePair(f"q{i}", "yes", "no") for i in range(4)]
            dpo.train_dpo(model(moe), None, CharTokenizer(), ps, None, args, loss_type="simpo")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "grad_norm" in r]
        assert len(steps) == 1
        assert ("moe_aux" in steps[0]) == moe
        if moe:
            assert 0 < steps[0]["moe_aux"] < steps[0]["loss"]


# -- rlhf -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_rlhf_minibatch_loss_adds_the_policys_aux(algo):
    from tritongpt.train.rlhf import PolicyWithValue, RLArgs, Rollout, minibatch_loss

    g = torch.Generator().manual_seed(7)
    B, T = 4, 12
    idx = torch.randint(0, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([T, 9, 7, T])  # right-padded after the shorter responses
    mask = torch.zeros(B, T - 1, dtype=torch.bool)
    mask[:, 4:] = True
    mask &= real(lengths - 1, T - 1)
    noise = lambda: 0.1 * torch.randn(B, T - 1, generator=g)  # noqa: E731
    model = PolicyWithValue(tiny_moe(0), value_head=algo == "ppo")
    with torch.no_grad():
        now = model.logprobs(idx)[0]
    adv = torch.randn(B, 1, generator=g)
    ro = Rollout(idx, torch.full((B,), 5), lengths, mask, torch.arange(B) // 2, logp=now + noise(),
                 ref_logp=now + noise(), values=noise(), advantages=adv * mask, returns=noise(),
                 seq_advantages=adv.squeeze(1), truncated=torch.zeros(B, dtype=torch.bool))
    args = RLArgs(algo=algo, kl_coef=0.05)
    sel = torch.arange(B)

    def fn(m, batch):
        loss, stats = minibatch_loss(m, ro, sel, args)
        assert stats["loss"] == pytest.approx(loss.item())  # the logged loss is the one trained
        aux = common.moe_aux_term(m, real(lengths, T))  # after minibatch_loss's forward: its routers' logits
        assert ("moe_aux" in stats) == (aux is not None)  # the logged column, at COEF only
        if aux is not None:
            assert stats["moe_aux"] == pytest.approx(aux.item(), rel=1e-6)
        return loss

    assert_adds_aux(fn, model, None, lambda m: m.logprobs(idx), mask=real(lengths, T))


# -- padding --------------------------------------------------------------------------------------------------
def test_the_aux_over_a_mask_is_transformers_with_its_attention_mask():
    """load_balancing_loss(mask=) is transformers' load_balancing_loss_func(attention_mask=) on the same float64
    router logits (value and gradient): the pad tokens out of both the routing shares and the probabilities."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tritongpt.model.layers import load_balancing_loss

    g = torch.Generator().manual_seed(2)
    B, T, E, K = 3, 6, 4, 2
    logits = [torch.randn(B * T, E, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    mask = real([6, 2, 4], T)
    ours = load_balancing_loss(logits, K, mask)
    theirs = load_balancing_loss_func(tuple(logits), E, K, attention_mask=mask.long())
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=0)
    assert abs(ours.item() - load_balancing_loss(logits, K).item()) > 1e-3  # the padding did weigh
    for a, b in zip(torch.autograd.grad(ours, logits), torch.autograd.grad(theirs, logits)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-9)
    assert torch.equal(load_balancing_loss(logits, K, torch.ones(B, T, dtype=torch.bool)),
                       load_balancing_loss(logits, K))
    assert load_balancing_loss(logits, K, torch.zeros(B, T, dtype=torch.bool)).item() == 0.0  # not 0 / 0


def repad(idx, pad):
    """idx with its pad positions (pad [B, T] true there) drawn anew: other pad ids."""
    g = torch.Generator().manual_seed(11)
    return torch.where(pad, torch.randint(1, VOCAB, idx.shape, generator=g), idx)


def packed_batch():
    ex = sft_examples(1)
    return sft.collate_packed([[ex[0], ex[1]], [ex[2]]], row_len=CTX, pad_id=0)


@pytest.mark.parametrize("job", ["sft", "sft_packed", "gkd", "dpo", "kto", "reward", "rlhf"])
def test_pad_tokens_change_nothing(job):
    """Each job's loss (the aux at COEF in it) is the same whatever ids the batch's padding holds: the routers'
    balance counts the real tokens only, as transformers' attention_mask has it (causal attention and the
    ignored targets already keep the padding out of everything else)."""
    from tritongpt.train.rlhf import PolicyWithValue, RLArgs, Rollout, minibatch_loss

    model = tiny_moe(0)
    if job in ("sft", "gkd"):
        batch = sft_batches(1)[1]
        fn = sft.sft_loss if job == "sft" else distill.sft_loss_fn(
            tiny_moe(1), {"distill_alpha": 0.6, "distill_temperature": 1.5, "distill_beta": 0.3}, VOCAB,
            sft.IGNORE_INDEX)
        other = (repad(batch[0], ~sft_real(1)), batch[1])
    elif job == "sft_packed":
        batch, fn = packed_batch(), sft.sft_loss
        pad = batch[2] == torch.tensor([[2], [1]])  # collate_packed's padding: doc id len(row)
        assert pad.any() and not pad.all()
        other = (repad(batch[0], pad), *batch[1:])
    elif job == "dpo":
        enc = pairs(5)
        batch, fn = dpo.DPOData(enc, None, pad_id=0).batch(range(4)), dpo.make_loss_fn(0.5, "simpo")
        other = (repad(batch[0], ~real(pair_batch(enc, pad_id=0)[1], batch[0].size(1))), *batch[1:])
    elif job == "kto":
        g = torch.Generator().manual_seed(6)
        enc = [kto.EncodedExample(prompt=ids(g, p), completion=ids(g, c), label=label)
               for p, c, label in ((5, 2, True), (3, 3, False), (4, 9, False), (2, 7, True))]
        data = kto.cache_reference(tiny_moe(1), kto.KTOData(enc, chunk=4, max_len=CTX, pad_id=0), "cpu")
        batch, fn = data.batch([0, 1, 2, 3]), kto.make_loss_fn(0.3, "kto")
        lengths = [len(e.prompt) + len(e.completion) for e in enc]
        other = (repad(batch[0], ~real(lengths, batch[0].size(1))), *batch[1:])
    elif job == "reward":
        enc = pairs(4, margins=True)
        idx, lengths, _ = pair_batch(enc, pad_id=0)
        model, fn = reward.RewardModel(model), reward.make_reward_loss()
        batch = (idx, lengths, reward.pair_margins(enc))
        other = (repad(idx, ~real(lengths, idx.size(1))), *batch[1:])
    else:
        g = torch.Generator().manual_seed(7)
        B, T = 4, 12
        idx, lengths = torch.randint(0, VOCAB, (B, T), generator=g), torch.tensor([T, 9, 7, T])
        mask = torch.zeros(B, T - 1, dtype=torch.bool)
        mask[:, 4:] = True
        mask &= real(lengths - 1, T - 1)
        model = PolicyWithValue(model, value_head=False)
        with torch.no_grad():
            now = model.logprobs(idx)[0]
        adv = torch.randn(B, 1, generator=g)

        def rollout(idx):
            return Rollout(idx, torch.full((B,), 5), lengths, mask, torch.arange(B) // 2, logp=now, ref_logp=now,
                           advantages=adv * mask, truncated=torch.zeros(B, dtype=torch.bool))

        batch, other = rollout(idx), rollout(repad(idx, ~real(lengths, T)))

        def fn(m, ro):
            return minibatch_loss(m, ro, torch.arange(B), RLArgs(algo="grpo", kl_coef=0.05))[0]

    assert not torch.equal(batch[0] if job != "rlhf" else batch.idx, other[0] if job != "rlhf" else other.idx)
    want, got = fn(model, batch), fn(model, other)
    want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
    assert common.moe_aux_term(model) is not None  # the aux is in the loss
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# -- --moe-aux-loss -------------------------------------------------------------------------------------------
def test_the_flag_sets_the_coefficient_and_is_refused_for_a_dense_model():
    import argparse

    from tritongpt.errors import UserError
    from tritongpt.train import common

    m = tiny_moe(0, coef=0.0)
    common.set_moe_aux_loss(m, argparse.Namespace(moe_aux_loss=None))
    assert m.config.moe_aux_loss == 0.0  # not given: --init's
    common.set_moe_aux_loss(m, argparse.Namespace(moe_aux_loss=0.02))
    assert m.config.moe_aux_loss == 0.02
    r = reward.RewardModel(tiny_moe(0, coef=0.0))
    common.set_moe_aux_loss(r, argparse.Namespace(moe_aux_loss=0.3))
    assert r.config.moe_aux_loss == 0.3
    with pytest.raises(UserError, match="GPTConfig.moe_aux_loss must be a finite number >= 0"):
        common.set_moe_aux_loss(m, argparse.Namespace(moe_aux_loss=-1.0))
    dense = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UserError, match=r"--moe-aux-loss 0\.02 weighs a mixture of experts' load-balancing loss, "
                                        r"and --init's model is dense \(n_experts 0\): leave the flag out"):
        common.set_moe_aux_loss(dense, argparse.Namespace(moe_aux_loss=0.02))


@pytest.mark.parametrize("cmd", ["sft", "dpo", "kto", "reward", "rlhf"])
def test_each_fine_tuning_command_reads_the_flag(cmd, tmp_path, monkeypatch, capsys):
    """A dense --init (rlhf, dpo, kto, reward: also their random preset) with --moe-aux-loss is refused by name,
    exit 2; a mixture-of-experts one trains with the flag's coefficient (the run stopped where it would start)."""
    from tritongpt import cli
    from tritongpt.train import rlhf

    small = dict(vocab_size=4096, context_length=64, n_embd=16, n_layer=1, n_head=2)  # the default tokenizer's
    GPTModel(GPTConfig(**small)).save(tmp_path / "dense.safetensors")
    GPTModel(GPTConfig(**small, mlp="swiglu", mlp_hidden=16, n_experts=4)).save(tmp_path / "moe.safetensors")
    extra = {"sft": ["--n-train", "4", "--n-eval", "1"], "rlhf": ["--reward", "exact"]}.get(cmd, [])
    argv = lambda init: [cmd, "--init", str(tmp_path / init), "--moe-aux-loss", "0.02", *extra,  # noqa: E731
                         "--tokenizer", "default", "--out-dir", str(tmp_path / f"run_{init}")]
    assert cli.main(argv("dense.safetensors")) == 2
    assert "--moe-aux-loss 0.02 weighs a mixture of experts' load-balancing loss" in capsys.readouterr().err

    class Started(Exception):
        pass

    def started(model, *a, **k):
        assert getattr(model, "config", None).moe_aux_loss == 0.02
        raise Started

    for mod, name in ((sft, "run_sft"), (dpo, "train_dpo"), (kto, "train_kto"), (reward, "train_reward_model"),
                      (rlhf, "RLHFTrainer")):
        if hasattr(mod, name):
            monkeypatch.setattr(mod, name, started)
    with pytest.raises(Started):
        cli.main(argv("moe.safetensors"))


def test_an_rlhf_resume_names_a_changed_coefficient(tmp_path, capsys):
    """rlhf's own trainer notes a --moe-aux-loss other than the checkpoint's run had (its policy's saved config),
    as the Trainer's resume does: the run goes on with another objective. The same coefficient notes nothing."""
    from tritongpt.train.rlhf import RLArgs, RLHFTrainer

    def trainer(coef, **kw):
        policy = tiny_moe(0, coef=coef)
        rm = reward.RewardModel(tiny_moe(1, coef=0.0))
        prompts = [ids(torch.Generator().manual_seed(i), 3 + i % 2) for i in range(4)]
        args = RLArgs(algo="grpo", out_dir=str(tmp_path), iterations=1, prompts_per_iter=2, group_size=2,
                      max_new_tokens=2, epochs=1, minibatch_size=4, eval_prompts=1, eval_samples=1, device="cpu",
                      kernels="reference", seed=0, dtype="fp32", **kw)
        return RLHFTrainer(policy, copy.deepcopy(policy), rm, prompts, prompts[:1], VOCAB - 1, args, log=True)

    trainer(0.02).save_checkpoint()
    capsys.readouterr()
    trainer(0.02, resume="latest").resume("latest")
    assert "moe-aux-loss" not in capsys.readouterr().err
    trainer(0.5, resume="latest").resume("latest")
    err = capsys.readouterr().err
    assert "resuming with --moe-aux-loss 0.5 (the run had 0.02)" in err, err


def test_gkds_fused_head_on_the_triton_path_adds_the_aux():
    """kernels mlp (moe_mlp) and cross_entropy (GKD's fused linear_distill_loss: the student's forward stops at
    the head's input): the routers still keep that forward's logits, and the aux joins the sum as on the
    reference path (the Triton interpreter on a CPU)."""
    micro, _ = sft_batches(3)
    batch = micro[0]
    opts = {"distill_alpha": 0.6, "distill_temperature": 1.5, "distill_beta": 0.3}
    m, teacher = tiny_moe(0), tiny_moe(1)
    for model in (m, teacher):
        model.set_kernels("mlp,cross_entropy", check_device=False)
    assert distill.fused_head(m, teacher, {}) and m.trf_blocks[0].ff.use_triton
    fn = distill.sft_loss_fn(teacher, opts, VOCAB, sft.IGNORE_INDEX)
    got, n = fn(m, batch)
    aux = m.router_aux_loss(sft_real(3, slice(0, 2)))
    m.config.moe_aux_loss = 0.0
    base, _ = fn(m, batch)
    assert (COEF * aux * n).item() > 1e-2 * base.item()
    torch.testing.assert_close(got, base + COEF * aux * n, rtol=1e-6, atol=1e-5)


# -- evaluations: the plain objective, never the aux ----------------------------------------------------------
def dense_ce(model, x, y):
    """The cross-entropy of model's logits, computed here (no forward(targets=), so no aux can enter)."""
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item()


def test_loss_eval_fn_and_the_trainers_evaluations_score_the_plain_cross_entropy(tmp_path):
    """pretrain's val_loss (loss_eval_fn over forward(targets=)'s mean, which adds COEF * aux in training) is the
    cross-entropy alone; so is any eval_fn the Trainer runs (its _side_run), and the coefficient comes back."""
    from tritongpt.train.loop import TrainArgs, Trainer, loss_eval_fn

    model = tiny_moe(0)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, VOCAB, (2, CTX + 1), generator=g) for _ in range(2)]

    def get_batch(split, gen):
        b = batches[int(torch.randint(2, (1,), generator=gen))]
        return b[:, :-1], b[:, 1:]

    def loss_fn(m, batch):  # pretrain's: the model's own mean loss
        return m(batch[0], targets=batch[1])

    with torch.no_grad():  # the training objective does add it: the eval would differ by COEF * aux
        x, y = get_batch("val", torch.Generator().manual_seed(0))
        assert loss_fn(model, (x, y)).item() > dense_ce(model, x, y) + 0.1
    gen = torch.Generator().manual_seed(0)
    want = sum(dense_ce(model, *get_batch("val", gen)) for _ in range(3)) / 3
    with torch.no_grad():
        got = loss_eval_fn(loss_fn, get_batch, 3)(model)["val_loss"]
    assert got == pytest.approx(want, rel=1e-5)
    assert model.config.moe_aux_loss == COEF

    args = TrainArgs(out_dir=str(tmp_path), max_steps=1, batch_size=2, device="cpu", dtype="fp32",
                     kernels="reference", eval_every=0, ckpt_every=0, log_every=0, sample_every=0)
    t = Trainer(model, args, loss_fn, get_batch)
    assert t._side_run(lambda m: loss_fn(m, (x, y)).item()) == pytest.approx(dense_ce(model, x, y), rel=1e-5)
    assert t.raw_model.config.moe_aux_loss == COEF


def test_without_moe_aux_restores_the_coefficient_after_an_error():
    model = tiny_moe(0)
    rm = SimpleNamespace(backbone=model)  # a reward model's routers are its backbone's
    with pytest.raises(RuntimeError, match="boom"):
        with common.without_moe_aux(rm):
            assert model.config.moe_aux_loss == 0.0
            raise RuntimeError("boom")
    assert model.config.moe_aux_loss == COEF
