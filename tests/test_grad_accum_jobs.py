"""Gradient accumulation per training job: --grad-accum k of micro-batches of b trains as one batch of k * b.

The Trainer's accumulation itself is test_loop.py's; here each job's own loss_fn goes through it, on micro-batches
of uneven lengths (padding, masked prompts, short and long answers), and the one optimizer step's gradients and
logged loss must be those of the whole batch in one micro-batch. What each job's full-batch loss is:

  pretrain   the token mean (every window counts B x T targets alike, so a mean of equal means is it)
  sft        the token mean over the counted (response) targets of the whole step: sft_loss returns (sum, count)
  distill    pretrain's and sft's, the teacher's divergence mixed in the same way (and its logged parts too)
  reward     the mean over pairs (Bradley-Terry, centering), as TRL's RewardTrainer: every micro-batch b pairs
  dpo        the mean over pairs (TRL's DPOTrainer); IPO's and SimPO's per-token log-prob means are per sequence
  kto        the mean over examples, apo_zero_unpaired: z0 (kto) is each micro-batch's own estimate, as TRL's
             (kto.py's docstring), so that loss type is not one batch's and is not compared here

RLHF (PPO, GRPO and its loss types, RLOO) takes one optimizer step a minibatch and has no --grad-accum.
Dropout is 0 in every model here (asserted): with it, two micro-batches draw other masks than one batch does.
"""
import copy

import pytest
import torch

import plot_stub
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train import distill, dpo, kto, reward, sft
from tritongpt.train.loop import TrainArgs, Trainer
from tritongpt.train.preference import EncodedPair, pair_batch

VOCAB, CTX = 53, 40
pytestmark = pytest.mark.usefixtures("one_thread")
no_plots = plot_stub.no_plots


def tiny(seed):
    torch.manual_seed(seed)
    m = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=CTX, n_embd=16, n_layer=1, n_head=2))
    assert m.config.dropout == 0.0  # see the module docstring
    return m


def ids(g, n):
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


def one_step(model, loss_fn, batches, out, step_metrics=None):
    """One optimizer step of the Trainer over `batches` (its micro-batches, grad_accum = len(batches)): the logged
    row and the gradients the optimizer saw."""
    batches = list(batches)
    args = TrainArgs(out_dir=str(out), max_steps=1, batch_size=1, grad_accum=len(batches), lr=1e-3, min_lr=1e-3,
                     warmup_steps=0, grad_clip=0.0, eval_every=0, ckpt_every=0, log_every=0, sample_every=0,
                     device="cpu", dtype="fp32", kernels="reference", seed=0)
    t = Trainer(model, args, loss_fn, lambda split, gen: batches.pop(0), step_metrics=step_metrics)
    grads, step = {}, t.optimizer.step

    def snapshot_then_step(*a, **k):
        grads.update({n: p.grad.clone() for n, p in t.raw_model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    t.optimizer.step = snapshot_then_step
    t.raw_model.train()
    row = t._train_step(t.raw_model)
    assert not batches
    return row, grads


def assert_accumulation_is_one_batch(model, loss_fn, micro, full, tmp_path, step_metrics=None):
    r1, g1 = one_step(copy.deepcopy(model), loss_fn, micro, tmp_path / "accum", step_metrics)
    r2, g2 = one_step(copy.deepcopy(model), loss_fn, [full], tmp_path / "full", step_metrics)
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-5) and r2["grad_norm"] > 0
    assert g1.keys() == g2.keys() and g2
    for n in g2:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)
    return r1, r2


# -- sft (and its teacher) ------------------------------------------------------------------------------------
def sft_examples(seed):
    """Two short examples with long prompts, then two long answers: 2 micro-batches counting ~4 and ~50 targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, answer in ((9, 2), (12, 3), (3, 24), (5, 30)):
        out.append(sft.Example(ids=ids(g, prompt + answer), prompt_len=prompt))
    return out


def sft_batches(seed):
    ex = sft_examples(seed)
    micro = [sft.collate(ex[:2], pad_id=0), sft.collate(ex[2:], pad_id=0)]
    counts = [int((y != sft.IGNORE_INDEX).sum()) for _, y in micro]
    assert 5 * counts[0] < counts[1], counts  # a mean of the two means would weigh a short answer's token 5x more
    return micro, sft.collate(ex, pad_id=0)


def test_sft_accumulates_as_one_batch_of_all_response_tokens(tmp_path):
    micro, full = sft_batches(1)
    assert_accumulation_is_one_batch(tiny(0), sft.sft_loss, micro, full, tmp_path)


def test_sft_with_a_teacher_accumulates_as_one_batch(tmp_path):
    micro, full = sft_batches(2)
    opts = {"distill_alpha": 0.6, "distill_temperature": 1.5, "distill_beta": 0.3}
    logged = []
    for run in ("accum", "full"):
        parts = distill.Parts()
        fn = distill.sft_loss_fn(tiny(1), opts, VOCAB, sft.IGNORE_INDEX, parts)
        batches = micro if run == "accum" else [full]
        row, _ = one_step(tiny(0), fn, batches, tmp_path / f"parts_{run}", step_metrics=parts.pop)
        logged.append(row)
    for key in ("loss", "distill_ce", "distill_kd"):  # the logged parts are token means of the step too
        assert logged[0][key] == pytest.approx(logged[1][key], rel=1e-5), key
    assert_accumulation_is_one_batch(tiny(0), distill.sft_loss_fn(tiny(1), opts, VOCAB, sft.IGNORE_INDEX), micro,
                                     full, tmp_path)


def test_pretrain_with_a_teacher_accumulates_as_one_batch(tmp_path):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, VOCAB, (4, 12), generator=g), torch.randint(0, VOCAB, (4, 12), generator=g)
    opts = {"distill_alpha": 0.4, "distill_temperature": 2.0, "distill_beta": 0.0}
    fn = distill.pretrain_loss_fn(tiny(1), opts, VOCAB, lambda x: None)
    assert_accumulation_is_one_batch(tiny(0), fn, [(x[:2], y[:2]), (x[2:], y[2:])], (x, y), tmp_path)


# -- preference jobs ------------------------------------------------------------------------------------------
def pairs(seed, margins=False):
    """Four pairs: two of short answers, then two of long ones (so per-pair and per-token weighting differ)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, a, b in ((6, 2, 3), (4, 3, 1), (3, 20, 14), (5, 12, 25)):
        m = float(torch.rand((), generator=g)) if margins else 0.0
        out.append(EncodedPair(prompt=ids(g, prompt), chosen=ids(g, a), rejected=ids(g, b), margin=m))
    return out


def test_reward_model_accumulates_as_one_batch_of_pairs(tmp_path):
    enc = pairs(4, margins=True)

    def batch(chunk):
        idx, lengths, _ = pair_batch(chunk, pad_id=0)
        return idx, lengths, reward.pair_margins(chunk)

    model = reward.RewardModel(tiny(0))
    fn = reward.make_reward_loss(center_rewards_coefficient=0.1)
    assert_accumulation_is_one_batch(model, fn, [batch(enc[:2]), batch(enc[2:])], batch(enc), tmp_path)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_dpo_accumulates_as_one_batch_of_pairs(tmp_path, loss_type):
    enc = pairs(5)
    ref = None
    if loss_type not in dpo.REFERENCE_FREE:  # a reference other than the policy: margins not 0 at the start
        ref = dpo.reference_logprobs(tiny(1), enc, 0, "cpu", mean=loss_type in dpo.PER_TOKEN)
    data = dpo.DPOData(enc, ref, pad_id=0)
    fn = dpo.make_loss_fn(0.5, loss_type)
    assert_accumulation_is_one_batch(tiny(0), fn, [data.batch([0, 1]), data.batch([2, 3])], data.batch(range(4)),
                                     tmp_path)


def test_kto_apo_zero_accumulates_as_one_batch_of_examples(tmp_path):
    g = torch.Generator().manual_seed(6)
    enc = [kto.EncodedExample(prompt=ids(g, p), completion=ids(g, c), label=label)
           for p, c, label in ((5, 2, True), (3, 3, False), (4, 22, False), (2, 30, True))]
    data = kto.cache_reference(tiny(1), kto.KTOData(enc, chunk=4, max_len=CTX, pad_id=0), "cpu", kl=False)
    fn = kto.make_loss_fn(0.3, "apo_zero_unpaired", desirable_weight=1.0, undesirable_weight=1.7)
    micro = [data.batch([0, 1], kl=False), data.batch([2, 3], kl=False)]
    assert_accumulation_is_one_batch(tiny(0), fn, micro, data.batch([0, 1, 2, 3], kl=False), tmp_path)
