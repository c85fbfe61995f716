"""GRPO's TRL GRPOConfig options in `tritongpt rlhf`: --clip-eps-high (DAPO's clip-higher), --mask-truncated
(DAPO's overlong filtering), --importance-sampling-level sequence (GSPO), --delta (INTELLECT-2's two-sided
clipping) and --loss-type dapo (the rollout's token count as the divisor), and the sign-aware clip statistics.

The minibatch loss is checked against an independent float64 computation, written with Python loops over the
responses, on a stand-in rollout whose "policy" is a tensor of logits: the loss, its statistics and its gradient
with respect to those logits.
"""
import math
import re

import pytest
import torch
import torch.nn as nn

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.common import MetricsLog
from tritongpt.train.rlhf import PolicyWithValue, RLArgs, Rollout, minibatch_loss

V, T = 11, 10  # vocab, tokens per row (T - 1 targets)


class Logits(nn.Module):
    """Stands in for PolicyWithValue: the logits (and PPO's values) of the rows of `idx` are the parameters;
    a minibatch's rows are found by their tokens."""

    def __init__(self, logits, idx):
        super().__init__()
        self.idx = idx
        self.logits = nn.Parameter(logits.clone())
        self.values = nn.Parameter(torch.zeros(logits.shape[:2]).narrow(1, 0, logits.size(1) - 1).clone())

    def forward(self, idx):
        rows = [next(i for i in range(len(self.idx)) if torch.equal(self.idx[i], r)) for r in idx]
        return self.logits[rows], self.values[rows]


def _logp64(logits, idx):
    """log pi of every target, float64, written out: log_softmax of position t, read at token t + 1."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return lp.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)


def _stand_in(log_ratios, adv_row, seed=0):
    """Rows with responses of 6, 4, 2 and 1 tokens (the last targets of each row); log_ratios[i] are the wanted
    log pi - log pi_old of row i's response tokens, adv_row each response's advantage."""
    g = torch.Generator().manual_seed(seed)
    lens = [len(r) for r in log_ratios]
    B = len(lens)
    idx = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T - 1, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, T - 1 - n:] = True
    model = Logits(torch.randn(B, T, V, generator=g), idx)
    with torch.no_grad():
        now = _logp64(model.logits, idx)
    lr = torch.zeros(B, T - 1, dtype=torch.float64)
    for i, r in enumerate(log_ratios):
        lr[i, T - 1 - len(r):] = torch.tensor(r, dtype=torch.float64)
    old = (now - lr).float()
    ref = (now + 0.3 * torch.randn(B, T - 1, generator=g, dtype=torch.float64)).float()
    adv = torch.tensor(adv_row).unsqueeze(1) * mask
    ro = Rollout(idx, torch.full((B,), 3), torch.full((B,), T), mask, torch.arange(B) // 2,
                 logp=old, ref_logp=ref, advantages=adv, truncated=torch.zeros(B, dtype=torch.bool))
    return model, ro


def _reference(model, ro, rows, args):
    """The loss in float64, one response at a time, and its gradient with respect to the logits; also the
    clipped fraction, the policy loss (token means over the kept responses' tokens) and {clip_frac_low,
    clip_frac_high}: the tokens below 1 - eps with A < 0, above the upper bound with A > 0."""
    logits = model.logits.detach().clone().double().requires_grad_(True)
    logp = _logp64(logits, ro.idx)
    lo, hi = 1 - args.clip_eps, 1 + (args.clip_eps if args.clip_eps_high is None else args.clip_eps_high)
    kept = [i for i in rows if not (args.mask_truncated and bool(ro.truncated[i]))]
    per_resp, tokens, pgs, clipped, low, high = [], [], [], 0, 0, 0
    for i in kept:
        ts = ro.mask[i].nonzero().flatten().tolist()
        lrs = [logp[i, t] - ro.logp[i, t].double() for t in ts]
        a = float(ro.advantages[i, ts[0]])
        if args.importance_sampling_level == "sequence":
            s = torch.exp(sum(lrs) / len(lrs))
            ratios = [s] * len(ts)
        else:
            ratios = [torch.exp(x) for x in lrs]
        losses = []
        for t, r in zip(ts, ratios):
            # --delta: the unclipped term's ratio is min(r, delta), a constant above it
            capped = r if args.delta is None or r.item() <= args.delta else torch.tensor(args.delta).double()
            pg = torch.maximum(-a * capped, -a * r.clamp(lo, hi))
            d = ro.ref_logp[i, t].double() - logp[i, t]
            losses.append(pg + args.kl_coef * (torch.exp(d) - d - 1))
            pgs.append(pg.item())
            clipped += int(r.item() < lo or r.item() > hi)
            low += int(r.item() < lo and a < 0)
            high += int(r.item() > hi and a > 0)
        per_resp.append(losses)
        tokens += losses
    zero = logits.sum() * 0
    if args.loss_type == "grpo":
        loss = sum((sum(ls) / len(ls) for ls in per_resp), zero) / max(len(per_resp), 1)
    elif args.loss_type == "bnpo":
        loss = sum(tokens, zero) / max(len(tokens), 1)
    elif args.loss_type == "dapo":  # every response token of the rollout, cut or not, per minibatch of an epoch
        n_all = sum(int(ro.mask[i].sum()) for i in range(len(ro)))
        steps = -(-len(ro) // args.minibatch_size)
        loss = sum(tokens, zero) / (n_all / steps)
    else:
        loss = sum(tokens, zero) / (max(len(per_resp), 1) * args.max_new_tokens)
    loss.backward()
    n = max(len(pgs), 1)
    return loss.item(), logits.grad, clipped / n, sum(pgs) / n, {"clip_frac_low": low / n, "clip_frac_high": high / n}


def _check(model, ro, rows, args):
    sel = torch.tensor(rows)
    model.zero_grad()
    loss, stats = minibatch_loss(model, ro, sel, args)
    loss.backward()
    want, grad, clip_frac, policy_loss, signed = _reference(model, ro, rows, args)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert stats["clip_frac"] == pytest.approx(clip_frac)
    for k, v in signed.items():
        assert stats[k] == pytest.approx(v), k
    assert stats["policy_loss"] == pytest.approx(policy_loss, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(model.logits.grad.double(), grad, rtol=1e-4, atol=1e-7)
    return loss, stats


# ratios on both sides of 1 - 0.2 = 0.8 and of 1 + 0.3 = 1.3 (and 1.25: clipped by a symmetric 0.2 only)
RATIOS = [[0.5, 0.79, 0.81, 1.25, 1.29, 1.31], [1.5, 0.7, 1.05, 1.28], [0.79, 1.31], [1.25]]
ADV = [1.1, -0.7, -1.4, 0.9]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_clip_higher_against_a_float64_computation(loss_type):
    """--clip-eps-high 0.3 with --clip-eps 0.2: the ratio is clipped to [0.8, 1.3]; clip_frac counts the tokens
    outside those bounds (here 7 of 13, where the symmetric clip counts 11); PPO's surrogate takes it too."""
    model, ro = _stand_in([[math.log(r) for r in row] for row in RATIOS], ADV)
    args = RLArgs(algo="grpo", clip_eps=0.2, clip_eps_high=0.3, kl_coef=0.1, loss_type=loss_type, max_new_tokens=8)
    _, stats = _check(model, ro, [0, 1, 2, 3], args)
    assert stats["clip_frac"] == pytest.approx(7 / 13)
    _, sym = _check(model, ro, [0, 1, 2, 3], RLArgs(algo="grpo", clip_eps=0.2, kl_coef=0.1, loss_type=loss_type,
                                                    max_new_tokens=8))
    assert sym["clip_frac"] == pytest.approx(11 / 13)
    # a ratio of 1.25 with A > 0: inside [0.8, 1.3] it passes a gradient, above 1.2 (symmetric) it does not
    one = [3]
    for high, moves in ((0.3, True), (None, False)):
        model.zero_grad()
        loss, _ = minibatch_loss(model, ro, torch.tensor(one), RLArgs(algo="grpo", clip_eps=0.2, clip_eps_high=high,
                                                                     kl_coef=0.0, loss_type=loss_type))
        loss.backward()
        assert (model.logits.grad.abs().max() > 0) == moves


def test_ppo_takes_clip_higher_in_its_surrogate():
    """PPO's policy loss is the same clipped surrogate: with --clip-eps-high it is the token mean of
    max(-A r, -A clip(r, 1 - eps, 1 + eps_high))."""
    model, ro = _stand_in([[math.log(r) for r in row] for row in RATIOS], ADV)
    ro.values, ro.returns = torch.zeros(4, T - 1), torch.zeros(4, T - 1)
    args = RLArgs(algo="ppo", clip_eps=0.2, clip_eps_high=0.3)
    args.validate()
    _, stats = minibatch_loss(model, ro, torch.arange(4), args)
    _, _, clip_frac, policy_loss, _ = _reference(model, ro, [0, 1, 2, 3], RLArgs(algo="grpo", clip_eps=0.2,
                                                                                  clip_eps_high=0.3))
    assert stats["policy_loss"] == pytest.approx(policy_loss, rel=1e-5)
    assert stats["clip_frac"] == pytest.approx(clip_frac) == pytest.approx(7 / 13)


# per-response mean log-ratios on both sides of each bound of [0.9, 1.15], with zero-mean spread
SEQ_MEANS = [math.log(0.85), math.log(1.2), math.log(1.05), math.log(0.95)]
SPREAD = [[0.3, -0.2, 0.1, -0.4, 0.25, -0.05], [0.5, -0.1, 0.2, -0.6], [0.4, -0.4], [0.0]]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_sequence_level_ratios_against_a_float64_computation(loss_type):
    """GSPO: s_i = exp(mean over response i's tokens of log pi - log pi_old), on each of its tokens, clipped as a
    token's ratio is; the gradient flows through the mean. Rows 0 and 1 clip (s = 0.85 < 0.9 with A < 0 and
    s = 1.2 > 1.15 with A > 0), rows 2 and 3 do not; per token, each row has ratios on both sides."""
    model, ro = _stand_in([[m + d for d in row] for m, row in zip(SEQ_MEANS, SPREAD)], [-1.0, 0.8, 1.3, -0.6])
    args = RLArgs(algo="grpo", clip_eps=0.1, clip_eps_high=0.15, kl_coef=0.05, loss_type=loss_type,
                  importance_sampling_level="sequence", max_new_tokens=8)
    _, stats = _check(model, ro, [0, 1, 2, 3], args)
    assert stats["clip_frac"] == pytest.approx((6 + 4) / 13)  # the tokens of rows 0 and 1
    # by hand for row 2 alone: its loss is -A s (unclipped), s the exp of its mean log-ratio
    loss, _ = minibatch_loss(model, ro, torch.tensor([2]), RLArgs(algo="grpo", kl_coef=0.0, clip_eps=0.1,
                                                                  clip_eps_high=0.15,
                                                                  importance_sampling_level="sequence"))
    assert loss.item() == pytest.approx(-1.3 * 1.05, rel=1e-5)
    # a response of one token: the sequence ratio is the token's
    one = dict(algo="grpo", kl_coef=0.05, loss_type=loss_type)
    seq, _ = minibatch_loss(model, ro, torch.tensor([3]), RLArgs(**one, importance_sampling_level="sequence"))
    tok, _ = minibatch_loss(model, ro, torch.tensor([3]), RLArgs(**one))
    assert seq.item() == pytest.approx(tok.item(), rel=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_masked_truncated_responses_leave_the_loss(loss_type, level):
    """--mask-truncated: the loss of a minibatch with cut responses is the loss of its other responses alone
    (grpo: their mean; bnpo: over their tokens; dr_grpo: / (kept x max_new_tokens)); all cut: 0, with a finite,
    zero gradient, and no statistics of the kept tokens (there are none)."""
    model, ro = _stand_in([[math.log(r) for r in row] for row in RATIOS], ADV)
    ro.truncated = torch.tensor([False, True, False, True])
    args = RLArgs(algo="grpo", clip_eps=0.2, clip_eps_high=0.3, kl_coef=0.1, loss_type=loss_type,
                  max_new_tokens=8, importance_sampling_level=level)
    loss, stats = _check(model, ro, [0, 1, 2, 3], RLArgs(**{**vars(args), "mask_truncated": True}))
    alone, alone_stats = minibatch_loss(model, ro, torch.tensor([0, 2]), args)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    for k in ("clip_frac", "policy_loss", "kl_k3", "entropy", "approx_kl"):
        assert stats[k] == pytest.approx(alone_stats[k], rel=1e-6), k
    model.zero_grad()
    none, stats = minibatch_loss(model, ro, torch.tensor([1, 3]), RLArgs(**{**vars(args), "mask_truncated": True}))
    none.backward()
    assert none.item() == 0.0 and stats["loss"] == 0.0
    assert not {"clip_frac", "policy_loss", "kl_k3", "entropy", "approx_kl"} & set(stats)  # nothing kept to measure
    assert torch.isfinite(model.logits.grad).all() and model.logits.grad.abs().max() == 0
    # without the flag the cut responses count
    with_cut, _ = minibatch_loss(model, ro, torch.arange(4), args)
    assert with_cut.item() != pytest.approx(alone.item(), rel=1e-3)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_the_defaults_are_todays_loss_bit_for_bit(algo):
    """The options at their defaults: the loss, its statistics and its gradient are those of an explicit
    --clip-eps-high equal to --clip-eps, token-level ratios and no masking; --mask-truncated with no response
    cut gives the same loss (to rounding), and the float64 computation agrees with the default."""
    model, ro = _stand_in([[math.log(r) for r in row] for row in RATIOS], ADV)
    ro.values, ro.returns = torch.zeros(4, T - 1), torch.randn(4, T - 1)
    out = []
    for args in (RLArgs(algo=algo), RLArgs(algo=algo, clip_eps_high=0.2, mask_truncated=False,
                                           importance_sampling_level="token")):
        model.zero_grad()
        loss, stats = minibatch_loss(model, ro, torch.arange(4), args)
        loss.backward()
        out.append((loss.detach(), stats, model.logits.grad.clone()))
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] == out[1][1] and torch.equal(out[0][2], out[1][2])
    if algo == "grpo":
        masked, _ = minibatch_loss(model, ro, torch.arange(4), RLArgs(algo=algo, mask_truncated=True))
        assert masked.item() == pytest.approx(out[0][0].item(), rel=1e-6)
        _check(model, ro, [0, 1, 2, 3], RLArgs(algo=algo))


@pytest.mark.parametrize("change, said", [
    (dict(clip_eps_high=0.0), "--clip-eps-high must be a finite number > 0, got 0.0"),
    (dict(clip_eps_high=-0.1), "--clip-eps-high must be a finite number > 0, got -0.1"),
    (dict(clip_eps_high=float("nan")), "--clip-eps-high must be a finite number > 0, got nan"),
    (dict(clip_eps_high=float("inf")), "--clip-eps-high must be a finite number > 0, got inf"),
    (dict(importance_sampling_level="seq"), "--importance-sampling-level must be one of token, sequence, got 'seq'"),
    (dict(algo="ppo", importance_sampling_level="sequence"), "--importance-sampling-level sequence is GRPO's"),
    (dict(algo="ppo", mask_truncated=True), "--mask-truncated is GRPO's"),
])
def test_bad_values_and_ppo_refusals_name_the_flag(change, said):
    with pytest.raises(UserError, match=re.escape(said)):
        RLArgs(**{"algo": "grpo", **change}).validate()


def test_rlhf_cli_grpo_with_all_three_and_a_resume_that_changes_one(tmp_path, capsys):
    """One GRPO iteration through the CLI with --clip-eps-high, --mask-truncated and --importance-sampling-level
    sequence, judged by a random reward model (the advantages are not 0); a random policy cuts every response, so
    every minibatch keeps none and its loss and gradient are 0. The run record holds the three, a resume with
    another --clip-eps-high is noted, and bad values and PPO refusals exit 2."""
    from tritongpt.cli import main
    from tritongpt.model.config import get_config
    from tritongpt.train.reward import RewardModel

    init, rm = tmp_path / "init.safetensors", tmp_path / "rm.safetensors"
    torch.manual_seed(0)
    GPTModel(get_config("tiny", vocab_size=4100, n_layer=1)).save(init)
    RewardModel(GPTModel(get_config("tiny", vocab_size=4100, n_layer=1))).save(rm)
    argv = ["rlhf", "--init", str(init), "--reward", str(rm), "--algo", "grpo",
            "--num-pairs", "40", "--prompts-per-iter", "2", "--group-size", "2", "--max-new-tokens", "4",
            "--epochs", "1", "--minibatch-size", "2", "--eval-prompts", "2", "--eval-samples", "1",
            "--device", "cpu", "--out-dir", str(tmp_path / "run"), "--mask-truncated",
            "--importance-sampling-level", "sequence", "--clip-eps", "3e-4"]
    assert main([*argv, "--clip-eps-high", "4e-4", "--iterations", "1"]) == 0
    rows = [r for r in MetricsLog(tmp_path / "run" / "metrics.jsonl").rows() if "loss" in r]
    # every response cut: no kept token, so no clip_frac (nor entropy) to log, rather than a 0
    assert rows and all(math.isfinite(r["loss"]) and "clip_frac" not in r and "entropy" not in r for r in rows)
    assert all(r["ended"] == 0 and r["loss"] == 0 and r["grad_norm"] == 0 and r["reward_std"] > 0 for r in rows)
    state = torch.load(tmp_path / "run" / "ckpt-0000001" / "state.pt", weights_only=False)
    assert (state["args"]["clip_eps_high"], state["args"]["mask_truncated"],
            state["args"]["importance_sampling_level"]) == (4e-4, True, "sequence")
    capsys.readouterr()
    assert main([*argv, "--clip-eps-high", "5e-4", "--iterations", "2", "--resume"]) == 0
    assert "resuming with --clip-eps-high 0.0005 (the run had 0.0004)" in capsys.readouterr().err
    for extra, said in ((["--clip-eps-high", "0"], "--clip-eps-high must be a finite number > 0, got 0.0"),
                        (["--clip-eps-high", "nan"], "--clip-eps-high must be a finite number > 0, got nan"),
                        (["--algo", "ppo"], "--importance-sampling-level sequence is GRPO's")):
        assert main([*argv, *extra, "--out-dir", str(tmp_path / "bad")]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main([*argv, "--importance-sampling-level", "seq"])
    assert "invalid choice: 'seq'" in capsys.readouterr().err


def test_sampled_rollouts_mark_the_responses_max_new_tokens_cut():
    """sample_responses fills Rollout.truncated: True where max_new_tokens cut the response before its eot (the
    rows --mask-truncated leaves out), False where the response ends with its eot; a hand-built rollout without
    it is refused by --mask-truncated rather than read as none cut."""
    from tritongpt.train.rlhf import sample_responses

    torch.manual_seed(14)
    policy = GPTModel(GPTConfig(vocab_size=23, context_length=16, n_embd=32, n_layer=1, n_head=2)).eval()
    prompts = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6, 7], [9, 9], [2, 4, 6]]
    ro = sample_responses(policy, prompts, 3, 4, eot_id=7, generator=torch.Generator().manual_seed(0))
    for r in range(len(ro)):
        resp = ro.idx[r, ro.prompt_lens[r]:ro.lengths[r]].tolist()
        assert bool(ro.truncated[r]) == (7 not in resp), f"row {r}: {resp}"
        assert len(resp) == 4 or not ro.truncated[r]
    assert 0 < int(ro.truncated.sum()) < len(ro), "want both kinds of response"
    ro.truncated, ro.logp, ro.ref_logp = None, torch.zeros(15, 8), torch.zeros(15, 8)
    ro.advantages = torch.zeros(15, 8)
    with pytest.raises(ValueError, match="mask_truncated needs the rollout's truncated responses"):
        minibatch_loss(PolicyWithValue(policy, value_head=False), ro, torch.arange(2),
                       RLArgs(algo="grpo", mask_truncated=True))


def test_an_iterations_statistics_are_those_of_its_kept_responses(tmp_path):
    """--mask-truncated: a minibatch whose every response was cut has no kept token to measure, so its entropy,
    clip_frac, approx_kl, kl_k3 and policy_loss are not in update()'s means (they were 0s there, pulling the
    iteration's logged entropy and KL toward 0 by the share of all-cut minibatches)."""
    from test_rlhf import _tiny_rl_trainer

    trainer = _tiny_rl_trainer(tmp_path, algo="grpo", group_size=2, minibatch_size=1, epochs=1,
                               mask_truncated=True, ent_coef=0.01)
    ro = trainer.rollout()
    ro.truncated = torch.arange(len(ro)) % 2 == 1  # half the responses cut: half the minibatches all cut
    out = trainer.update(ro)
    assert len(trainer.update_log) == len(ro)
    for key in ("entropy", "clip_frac", "approx_kl", "kl_k3", "policy_loss"):
        vals = [s[key] for s in trainer.update_log if key in s]
        assert len(vals) == len(ro) // 2, key  # the kept minibatches' only
        assert out[key] == pytest.approx(sum(vals) / len(vals), rel=1e-6), key
    assert out["entropy"] > 0
    assert all("loss" in s for s in trainer.update_log)  # the loss (0 for an all-cut one) is each step's


# -- --delta, --loss-type dapo and the sign-aware clip statistics ------------------------------------------------
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_delta_caps_the_unclipped_term_against_a_float64_computation(loss_type):
    """--delta 1.4 with the clip [0.8, 1.3]: row 1 (A < 0) has a ratio of 1.5, whose unclipped term -A r is capped
    at -A 1.4, a constant: its loss is smaller and its gradient stops; without --delta it is -A 1.5 and moves. A > 0
    tokens above the cap (row 0's 1.31 is below it) are the clip's already. The same at the sequence level."""
    model, ro = _stand_in([[math.log(r) for r in row] for row in RATIOS], ADV)
    args = RLArgs(algo="grpo", clip_eps=0.2, clip_eps_high=0.3, delta=1.4, kl_coef=0.1, loss_type=loss_type,
                  max_new_tokens=8, minibatch_size=2)
    capped, _ = _check(model, ro, [0, 1, 2, 3], args)
    free, _ = _check(model, ro, [0, 1, 2, 3], RLArgs(**{**vars(args), "delta": None}))
    assert capped.item() < free.item()
    for delta, moves in ((1.4, False), (None, True)):  # row 1's 1.5 token alone, no KL term
        model.zero_grad()
        only = RLArgs(algo="grpo", clip_eps=0.2, clip_eps_high=0.3, delta=delta, kl_coef=0.0, loss_type="bnpo")
        loss, _ = minibatch_loss(model, ro, torch.tensor([1]), only)
        loss.backward()
        row = model.logits.grad[1]
        # the 1.5 token is row 1's first response target (T - 1 - 4 = 5): position 5's logits
        assert (row[5].abs().max() > 0) == moves
        # -A max(min(r, delta), clip(r)) per token: 0.7 x (1.4 or 1.5, 0.8, 1.05, 1.28)
        assert loss.item() == pytest.approx(0.7 * ((1.4 if delta else 1.5) + 0.8 + 1.05 + 1.28) / 4, rel=1e-5)
    # sequence level: response means of 1.6 (A < 0: capped at 1.5) and 1.2 (A > 0: the clip's), 0.95 and 1.05
    model, ro = _stand_in([[math.log(m) + d for d in row] for m, row in zip([1.6, 1.2, 0.95, 1.05], SPREAD)],
                          [-1.0, 0.8, 1.3, -0.6])
    seq = RLArgs(algo="grpo", clip_eps=0.1, clip_eps_high=0.15, delta=1.5, kl_coef=0.05, loss_type=loss_type,
                 importance_sampling_level="sequence", max_new_tokens=8, minibatch_size=3)
    capped, _ = _check(model, ro, [0, 1, 2, 3], seq)
    free, _ = _check(model, ro, [0, 1, 2, 3], RLArgs(**{**vars(seq), "delta": None}))
    assert capped.item() < free.item()
    loss, _ = minibatch_loss(model, ro, torch.tensor([0]), RLArgs(**{**vars(seq), "kl_coef": 0.0, "loss_type": "grpo"}))
    assert loss.item() == pytest.approx(1.0 * 1.5, rel=1e-6)  # -A min(s, delta) = 1.5, not 1.6


def test_ppo_takes_delta_in_its_surrogate():
    """PPO's policy loss is the same surrogate: with --delta it is the token mean of
    max(-A min(r, delta), -A clip(r, 1 - eps, 1 + eps_high)), as --clip-eps-high is taken."""
    model, ro = _stand_in([[math.log(r) for r in row] for row in RATIOS], ADV)
    ro.values, ro.returns = torch.zeros(4, T - 1), torch.zeros(4, T - 1)
    args = RLArgs(algo="ppo", clip_eps=0.2, clip_eps_high=0.3, delta=1.4)
    args.validate()
    _, stats = minibatch_loss(model, ro, torch.arange(4), args)
    _, _, _, policy_loss, _ = _reference(model, ro, [0, 1, 2, 3], RLArgs(algo="grpo", clip_eps=0.2, clip_eps_high=0.3,
                                                                         delta=1.4))
    _, free = minibatch_loss(model, ro, torch.arange(4), RLArgs(algo="ppo", clip_eps=0.2, clip_eps_high=0.3))
    assert stats["policy_loss"] == pytest.approx(policy_loss, rel=1e-5)
    assert stats["policy_loss"] < free["policy_loss"]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("truncated", [False, True], ids=["all kept", "two cut"])
def test_dapo_divides_by_the_rollouts_tokens_against_a_float64_computation(level, truncated):
    """--loss-type dapo: each minibatch's summed token losses / (the rollout's 13 response tokens / 2 minibatches),
    for minibatches of 7 and 6 tokens (rows of 6 + 1 and 4 + 2), where bnpo divides by 7 and 6. The count is taken
    before --mask-truncated: the cut rows' tokens stay in it (TRL's num_items_in_batch is counted before masking).
    An epoch's dapo losses sum to the mean over all 13 tokens times the minibatches; one minibatch: bnpo's loss."""
    model, ro = _stand_in([[math.log(r) for r in row] for row in RATIOS], ADV)
    ro.truncated = torch.tensor([False, True, False, True]) if truncated else ro.truncated
    args = RLArgs(algo="grpo", clip_eps=0.2, clip_eps_high=0.3, kl_coef=0.1, loss_type="dapo", max_new_tokens=8,
                  minibatch_size=2, importance_sampling_level=level, mask_truncated=truncated)
    dapo = [_check(model, ro, rows, args)[0].item() for rows in ([0, 3], [1, 2])]
    bnpo = [minibatch_loss(model, ro, torch.tensor(rows), RLArgs(**{**vars(args), "loss_type": "bnpo"}))[0].item()
            for rows in ([0, 3], [1, 2])]
    kept = {0: 6, 3: 1, 1: 4, 2: 2} if not truncated else {0: 6, 3: 0, 1: 0, 2: 2}
    for d, b, rows in zip(dapo, bnpo, ([0, 3], [1, 2])):
        n = sum(kept[r] for r in rows)
        assert d == pytest.approx(b * n / 6.5, rel=1e-5)  # the same sum, over 6.5 instead of the kept tokens
        assert d != pytest.approx(b, rel=1e-3)
    whole = minibatch_loss(model, ro, torch.arange(4), RLArgs(**{**vars(args), "loss_type": "bnpo"}))[0].item()
    assert sum(dapo) == pytest.approx(2 * whole * sum(kept.values()) / 13, rel=1e-5)
    # a minibatch of the whole rollout: dapo is bnpo (all kept), or its sum over all 13 tokens (two cut)
    one = RLArgs(**{**vars(args), "minibatch_size": 4})
    d1 = _check(model, ro, [0, 1, 2, 3], one)[0].item()
    assert d1 == pytest.approx(whole * sum(kept.values()) / 13, rel=1e-5)
    # minibatches of 3: ceil(4 / 3) = 2 of them, the divisor 13 / 2 again
    three = RLArgs(**{**vars(args), "minibatch_size": 3})
    assert _check(model, ro, [0, 1, 2], three)[0].item() == pytest.approx(
        minibatch_loss(model, ro, torch.tensor([0, 1, 2]), args)[0].item(), rel=1e-6)


def test_sign_aware_clip_fractions_by_hand():
    """clip_frac_low counts the tokens below 1 - eps whose advantage is negative, clip_frac_high those above
    1 + eps_high whose advantage is positive (TRL's clip_ratio/low_mean and high_mean); clip_frac stays the
    fraction outside the bounds, whatever the sign. Clip [0.8, 1.3], advantages +, -, +, +:
        row 0 (A > 0)  0.5 0.79 0.81 1.25 1.29 1.31   high: 1.31
        row 1 (A < 0)  1.5 0.7 1.05 1.28              low: 0.7
        row 2 (A > 0)  0.79 1.31                      high: 1.31
        row 3 (A > 0)  1.25
    low 1/13, high 2/13, clip_frac 7/13; the iteration logs their means over its minibatches."""
    model, ro = _stand_in([[math.log(r) for r in row] for row in RATIOS], [1.1, -0.7, 1.4, 0.9])
    args = RLArgs(algo="grpo", clip_eps=0.2, clip_eps_high=0.3, kl_coef=0.1)
    _, stats = _check(model, ro, [0, 1, 2, 3], args)
    assert (stats["clip_frac_low"], stats["clip_frac_high"], stats["clip_frac"]) == pytest.approx((1 / 13, 2 / 13,
                                                                                                  7 / 13))
    _, stats = _check(model, ro, [1, 2], args)  # row 1 and 2's 6 tokens: 0.7 low, 1.31 high
    assert (stats["clip_frac_low"], stats["clip_frac_high"]) == pytest.approx((1 / 6, 1 / 6))
    # the symmetric clip [0.8, 1.2]: row 0's 1.25, 1.29 and row 3's 1.25 are now above it too (A > 0)
    _, stats = _check(model, ro, [0, 1, 2, 3], RLArgs(algo="grpo", clip_eps=0.2, kl_coef=0.1))
    assert (stats["clip_frac_low"], stats["clip_frac_high"]) == pytest.approx((1 / 13, 5 / 13))
    # every response cut: nothing kept to measure, no statistic rather than a 0
    ro.truncated = torch.ones(4, dtype=torch.bool)
    _, stats = minibatch_loss(model, ro, torch.arange(4), RLArgs(**{**vars(args), "mask_truncated": True}))
    assert not {"clip_frac_low", "clip_frac_high"} & set(stats)


@pytest.mark.parametrize("change, said", [
    (dict(delta=1.2), "--delta must be a finite number > 1 + --clip-eps-high (unset: --clip-eps) = 1.2, got 1.2"),
    (dict(delta=1.25, clip_eps_high=0.28), "--delta must be a finite number > 1 + --clip-eps-high = 1.28, got 1.25"),
    (dict(delta=1.5, clip_eps_high=0.5), "--delta must be a finite number > 1 + --clip-eps-high = 1.5, got 1.5"),
    (dict(delta=0.5, clip_eps=0.1), "> 1 + --clip-eps-high (unset: --clip-eps) = 1.1, got 0.5"),
    (dict(delta=float("nan")), "--delta must be a finite number > 1 + --clip-eps-high (unset: --clip-eps) = 1.2, "
                               "got nan"),
    (dict(delta=float("inf")), "got inf"),
    (dict(algo="ppo", loss_type="dapo"), "--loss-type dapo is GRPO's"),
    (dict(loss_type="DAPO"), "--loss-type must be one of grpo, bnpo, dr_grpo, dapo, got 'DAPO'"),
])
def test_delta_and_dapo_refusals_name_the_flags(change, said):
    with pytest.raises(UserError, match=re.escape(said)):
        RLArgs(**{"algo": "grpo", **change}).validate()
    for ok in (dict(algo="grpo", delta=1.21), dict(algo="ppo", delta=4.0, clip_eps_high=0.28),
               dict(algo="grpo", loss_type="dapo")):
        RLArgs(**ok).validate()


def test_rlhf_cli_grpo_dapo_with_delta_and_a_resume_that_changes_delta(tmp_path, capsys):
    """One GRPO iteration through the CLI with --loss-type dapo --delta 4, judged by a random reward model (the
    advantages are not 0): finite losses that move the policy, the sign-aware clip fractions logged beside
    clip_frac, both flags in the run record, a resume with another --delta noted, and a bad --delta exits 2."""
    from tritongpt.cli import main
    from tritongpt.model.config import get_config
    from tritongpt.train.reward import RewardModel

    init, rm = tmp_path / "init.safetensors", tmp_path / "rm.safetensors"
    torch.manual_seed(0)
    GPTModel(get_config("tiny", vocab_size=4100, n_layer=1)).save(init)
    RewardModel(GPTModel(get_config("tiny", vocab_size=4100, n_layer=1))).save(rm)
    argv = ["rlhf", "--init", str(init), "--reward", str(rm), "--algo", "grpo", "--loss-type", "dapo",
            "--num-pairs", "40", "--prompts-per-iter", "2", "--group-size", "2", "--max-new-tokens", "4",
            "--epochs", "2", "--minibatch-size", "3", "--eval-prompts", "2", "--eval-samples", "1", "--lr", "1e-3",
            "--device", "cpu", "--out-dir", str(tmp_path / "run")]
    assert main([*argv, "--delta", "4", "--iterations", "1"]) == 0
    rows = [r for r in MetricsLog(tmp_path / "run" / "metrics.jsonl").rows() if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) and r["reward_std"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert all(0 <= r["clip_frac_low"] + r["clip_frac_high"] <= r["clip_frac"] + 1e-6 <= 1 + 1e-6 for r in rows)
    state = torch.load(tmp_path / "run" / "ckpt-0000001" / "state.pt", weights_only=False)
    assert (state["args"]["loss_type"], state["args"]["delta"]) == ("dapo", 4.0)
    capsys.readouterr()
    assert main([*argv, "--delta", "5", "--iterations", "2", "--resume"]) == 0
    assert "resuming with --delta 5.0 (the run had 4.0)" in capsys.readouterr().err
    assert main([*argv, "--delta", "1.1", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "--delta must be a finite number > 1 + --clip-eps-high (unset: --clip-eps) = 1.2, got 1.1" in \
        capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_scale_by_the_unbiased_std_as_trl(scale):
    """TRL GRPOTrainer: (r - mean of the group) / (std + 1e-4), std torch's default, the sample (Bessel-corrected)
    one, of the group's rewards (scale_rewards group) or of the whole batch's (batch); none: not divided. Written
    out in float64 over groups of 2, 3 and 4 given out of order."""
    from tritongpt.train.rlhf import group_advantages

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(9, generator=g, dtype=torch.float64) * 3
    group = torch.tensor([2, 0, 1, 2, 0, 2, 1, 1, 2])
    got = group_advantages(scores, group, scale=scale)
    r = scores.tolist()
    batch_mean = sum(r) / len(r)
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in r) / (len(r) - 1))
    for i in range(len(r)):
        mine = [r[j] for j in range(len(r)) if group[j] == group[i]]
        mean = sum(mine) / len(mine)
        std = math.sqrt(sum((x - mean) ** 2 for x in mine) / (len(mine) - 1))
        want = r[i] - mean
        if scale != "none":
            want /= (std if scale == "group" else batch_std) + 1e-4
        assert got[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12), i


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_lone_response_or_a_rollout_of_one_has_advantage_zero_not_nan(scale):
    """TRL's: a group of one (std 0, not 0/0) and a batch of one (its std taken as 0, where torch.std of one value
    is NaN) give a lone response the advantage 0; the other responses keep theirs, and all are finite."""
    from tritongpt.train.rlhf import group_advantages

    for scores, group in ((torch.tensor([2.5]), torch.tensor([3])),
                          (torch.tensor([1.0, 4.0, -2.0]), torch.tensor([0, 0, 1]))):
        got = group_advantages(scores, group, scale=scale)
        assert torch.isfinite(got).all() and got[-1] == 0, (scale, got)
        if len(scores) > 1:  # (the group of two: +-1.5 centered, divided by its sample std or the batch's)
            div = {"group": 1.5 * 2 ** 0.5 + 1e-4, "batch": scores.std().item() + 1e-4, "none": 1}[scale]
            assert got[:2].tolist() == pytest.approx([-1.5 / div, 1.5 / div], rel=1e-6)
