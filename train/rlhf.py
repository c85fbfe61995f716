"""RLHF against a reward model (or a verifier): PPO (with a value head), GRPO (group-relative, no critic) and RLOO
(REINFORCE leave-one-out, no critic).

One iteration, every algorithm:

  1. rollouts   sample responses to a batch of prompts from the current policy
                (train.generate with its KV cache; on the Triton path that is the fused
                attention kernel), stopping at end-of-text; tokens after it are masked out.
  2. score      the reward model scores every prompt + response at its last token; the frozen
                SFT reference gives log pi_ref for every response token.
  3. update     several epochs of minibatch gradient steps on the clipped surrogate, with the
                log-probs of step 2 as the "old" policy.
                One optimizer step a minibatch, no gradient accumulation; where --minibatch-size does not
                divide the rollout, each epoch's last minibatch is smaller and still one whole step (its
                loss a mean over its own responses or tokens; dapo's divisor, per minibatch, is the same).

pi is the policy at the sampling temperature, softmax(logits / temperature), and pi_ref the
reference at the same temperature, as in Ziegler et al.'s code and TRL: the rollouts are drawn
from pi, and the ratios, the KL penalty and k3 below estimate what they claim only under the
distribution that drew the samples. (Temperature-1 log-probs with rollouts at 0.5 can turn the
penalty into a bonus: pi = (0.7, 0.3), pi_ref = (0.9, 0.1) give E[log pi - log pi_ref] = -0.042.)

PPO (Schulman et al. 2017, as applied to language models by Ziegler et al. 2019 / Ouyang et
al. 2022): every response token is an action. Its reward is
        r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t))  (+ the reward model's score at the last token)
so the KL penalty is per token, in the reward. A value head (Linear(C, 1) on the policy's own
hidden states) predicts the return; GAE(gamma, lambda) gives advantages, whitened over the
batch's response tokens (their sample variance, TRL's masked_whiten). Loss = clipped policy loss
+ vf_coef * clipped value loss - ent_coef * entropy.

GRPO (Shao et al. 2024, DeepSeekMath): G responses per prompt; each response's advantage is
its reward standardized within its group, (r - mean_G) / (std_G + eps) with std_G the sample std
(G - 1, TRL's torch.std), given to every one of its tokens; no value head. The KL to the reference
is NOT in the reward: it is a loss term, kl_coef * k3 per token, with the unbiased, never-negative estimator
        k3 = pi_ref/pi - log(pi_ref/pi) - 1
averaged over each response's tokens and then over responses, as in the paper (--loss-type grpo, the default;
the other loss types aggregate it with the surrogate, per token: grpo_aggregate).

RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs"; as TRL's RLOOTrainer, trl/trainer/rloo_trainer.py, since v0.22 built like its GRPOTrainer):
k >= 2 responses per prompt (--group-size, default 2 as TRL's num_generations) and no value head. A response is
one action. The KL penalty is in its reward, for the whole sequence (reward shaping, not a loss term as GRPO's):
        R_i = score_i - kl_coef * sum_t (log pi_old(a_t) - log pi_ref(a_t))
with log pi_old the rollout's, and its advantage is R_i minus the mean of the OTHER k - 1 rewards of its prompt,
        A_i = R_i - (sum_j R_j - R_i) / (k - 1)
an unbiased baseline, since it does not depend on response i. --normalize-advantages (TRL's normalize_advantages)
then standardizes the rollout's advantages, (A - mean) / (std + 1e-4); --reward-clip-range LO HI (TRL's
reward_clip_range) clamps the score before the KL (and --missing-eot-penalty) is taken off. The surrogate is PPO's
clipped one with one ratio per response, the exp of the SUM over its tokens of log pi - log pi_old (the sequence's
likelihood ratio; GSPO's is the mean), clipped to [1 - clip_eps, 1 + clip_eps_high], and the loss is the mean over
the minibatch's responses of max(-A r, -A clip(r)). --mask-truncated gives a cut response a loss of 0 in that mean
(TRL zeroes its tokens: ratio 1, no gradient), its KL stays in its reward (TRL's mask zeroes that too). Its clip
statistics are per response, as TRL's. GRPO's --loss-type, --scale-rewards, --importance-sampling-level and --delta
and PPO's value and GAE flags do not apply and are refused.

The judge is a reward model from `tritongpt reward`, or, with --reward exact or number, a
verifier (TaskReward): 1 for a response that matches its prompt's reference answer, else 0, as
DeepSeek-R1-Zero's rule-based rewards and TRL's GRPO reward functions score (RL with verifiable
rewards). The references are the embedded tasks' answers, or a --data file's: SFT records'
completions, or preference pairs' chosen answers. `exact` compares the whole answer, `number`
its last number (GSM8K's). Nothing is learned about the judge then, and eval_reward is the
held-out match rate.

Several judges (TRL GRPOTrainer's reward_funcs and reward_weights): --reward is repeatable, and
--reward-weights w1 w2 ... (default all 1) weighs them; a response's score is then the weighted sum
        score = sum_i w_i * score_i
of every judge's own score (WeightedReward), taken before anything else is done with it, by both
algorithms. With a verifier among them, the prompts and reference answers are the verifier's (as for a
verifier alone) and every reward model scores the responses to those same prompts. A weight may be
negative (a judge to steer away from) or 0 (logged, not optimised); all 0 is refused, as is a judge
given twice (a weight of 2 says that). One --reward with weight 1 is today's run, its record too.

GRPO's variants (TRL GRPOConfig's names; --loss-type and --scale-rewards are described at GRPO_LOSS_TYPES):
  --clip-eps-high E  (DAPO's clip-higher, Yu et al. 2025; TRL's epsilon_high) the ratio is clipped to
        [1 - clip_eps, 1 + E], so a token the policy made likelier may rise further before its gradient stops;
        clip_frac counts the ratios outside those bounds. The surrogate is PPO's too, and PPO takes it (VAPO,
        Yue et al. 2025, runs clip-higher with a value head). Not given: E = clip_eps, the symmetric clip.
  --mask-truncated  (TRL's mask_truncated_completions, DAPO's overlong filtering) a response that
        max_new_tokens cut before its end-of-text leaves the loss: its tokens are masked out of the surrogate,
        the k3 term, the entropy bonus and their logged statistics, and the minibatch is aggregated as if it
        were not in it (grpo: the mean over the kept responses; bnpo: over their tokens; dr_grpo: / (kept x
        max_new_tokens); none kept: a loss of 0). Its score still counts in its group's mean and std, as in TRL,
        which masks after computing the advantages. GRPO and RLOO (RLOO's, above): PPO's value head and
        per-token KL rewards see the cut responses (--missing-eot-penalty is the way to discourage them there).
  --importance-sampling-level sequence  (GSPO, Zheng et al. 2025; TRL's importance_sampling_level) one ratio
        per response, s = exp(mean over its response tokens of log pi - log pi_old), on every one of its tokens,
        clipped to the same bounds (GSPO's paper: clip_eps 3e-4, clip_eps_high 4e-4, as the ratio of a mean is
        near 1); clip_frac counts every token of a clipped response. GRPO only: GSPO weighs one advantage
        per response; PPO's are per token. token: today's.
  --delta D  (INTELLECT-2's two-sided clipping, Prime Intellect 2025; TRL's delta) the surrogate's unclipped term
        takes min(ratio, D): loss = max(-A min(r, D), -A clip(r, 1 - clip_eps, 1 + E)), as TRL clamps its coef_1,
        at either importance-sampling level. It bounds the loss (and gradient) of a token with A < 0 whose ratio
        ran far above 1, which the one-sided clip leaves unbounded. D must be > 1 + E (TRL recommends it; here it
        is refused otherwise: a lower cap would stop the gradient of A > 0 tokens before the clip does). PPO takes
        it, as it takes --clip-eps-high: the surrogate is shared. Not given: no cap, today's.
  --loss-type dapo  (TRL's dapo) the minibatch's summed token losses divided by the rollout's response tokens per
        minibatch (GRPO_LOSS_TYPES): TRL normalizes by num_items_in_batch, the generation batch's tokens over every
        process, rescaled to one optimizer step; here the rollout is the generation batch and each minibatch one
        step. The count is taken before --mask-truncated, as in TRL: the cut responses' tokens stay in it.

Every algorithm: --missing-eot-penalty takes a constant off the score of each response that max_new_tokens
cut before its end-of-text (the reward model never saw an answer end there); with several judges it comes off
the weighted sum, once (RLOO: after --reward-clip-range's clamp, which would otherwise take it back).

Logged per iteration (metrics.jsonl + rlhf.png): reward (mean score of the rollouts, penalty
included), kl (mean over responses of sum_t log pi - log pi_ref, measured at rollout time, the
same for every algorithm), entropy, clip_frac (the ratios outside the clip bounds), clip_frac_low and
clip_frac_high (TRL's clip_ratio/low_mean and high_mean: those the clip stops, below 1 - clip_eps with A < 0,
above the upper bound with A > 0; per token), value_loss (PPO), policy_loss, response_len,
ended (the fraction of responses that reached end-of-text), and every eval_every iterations
eval_reward and eval_ended: the reward model's mean score (no penalty) on fixed held-out
prompts, sampled with a fixed seed, so the numbers are comparable across iterations and runs.
With several judges (or a weight other than 1), reward and eval_reward are the weighted sums, and
each judge's own mean score is logged beside them (TRL's rewards/<func>/mean) as reward_<key> and
eval_reward_<key>: key is a verifier's name (exact, number) or rm<i> for the reward model given as
the i-th --reward (1-based, counting verifiers too), e.g. `--reward exact --reward runs/rm` logs
reward_exact and reward_rm2. The per-judge means are raw scores: no weight, no penalty. RLOO also logs TRL's
kl_token (the mean over every response token of log pi - log pi_ref) and frac_reward_zero_std (the prompts whose
k shaped rewards are all equal: nothing to learn from them), and reward is the raw score, as TRL's.
"""
import copy
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from tritongpt.errors import UserError, note
from tritongpt.model.gpt import GPTModel, entropy_of
from tritongpt.train import common, tasks
from tritongpt.train.generate import check_graphable, generate
from tritongpt.train.preference import (encode_prompt, next_token_logprobs, pad_sequences, pick_next_tokens,
                                        response_mask)
from tritongpt.cli import command_help


# Flags that change what a resumed run computes (--iterations does not: the learning rate is
# constant), named in a note when a resume changes them; the precision is compared as resolved.
TRAJECTORY_ARGS = ("algo", "prompts_per_iter", "group_size", "max_new_tokens", "missing_eot_penalty", "temperature",
                   "top_k", "epochs", "minibatch_size", "lr", "weight_decay", "grad_clip", "kl_coef", "clip_eps",
                   "value_clip", "vf_coef", "ent_coef", "gamma", "lam", "seed", "loss_type", "scale_rewards",
                   "clip_eps_high", "mask_truncated", "importance_sampling_level", "delta", "normalize_advantages",
                   "reward_clip_range")
# GRPO's variants, by TRL's GRPOConfig names. loss_type: how the per-token losses of a minibatch become one
#   grpo     each response's token mean, then the mean over responses (DeepSeekMath's; a long response's tokens
#            weigh less)
#   bnpo     the mean over every response token of the minibatch (DAPO's token-level loss, one gradient step here)
#   dr_grpo  the sum over response tokens / (responses x max_new_tokens), a constant (Dr. GRPO, Liu et al. 2025:
#            no length bias)
#   dapo     the sum over the minibatch's response tokens / (the response tokens of the WHOLE rollout / its
#            minibatches per epoch): TRL's dapo, whose num_items_in_batch counts the generation batch's tokens and
#            whose normalizer is rescaled to one optimizer step's share of it (num_items_in_batch / processes x
#            grad_accum / steps_per_generation). Every token of the rollout weighs the same, whichever minibatch
#            it falls in; bnpo weighs a token of a minibatch of short responses more. One minibatch: bnpo's loss.
# scale_rewards: what a response's centered score r - mean_G is divided by: group (its group's std, GRPO's),
#   batch (the whole rollout's std) or none (Dr. GRPO: no difficulty bias from near-constant groups)
# The std the advantages are scaled by, recorded in every checkpoint: "sample" (n - 1, TRL's torch.std and
# masked_var) for GRPO's group and batch std and PPO's whitening. A checkpoint without it predates them: its run
# took the population std (n), which a resume notes (Trainer._note_population_std).
ADVANTAGE_STD = "sample"
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
# importance_sampling_level (TRL's name): the ratio the surrogate clips, one per response token (token, PPO's and
#   GRPO's) or one per response, exp of the mean over its tokens of log pi - log pi_old, on every one of them
#   (sequence, GSPO's, Zheng et al. 2025)
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ALGOS = ("ppo", "grpo", "rloo")


# --reward NAME: a verifier in the reward model's place (TaskReward); `tasks` is stop 27's name
# for `exact`, kept. A reward model folder of one of these names is given as ./NAME.
VERIFIERS = {"exact": tasks.exact_match, "number": tasks.number_match, "tasks": tasks.exact_match}
MATCHED = {"exact": "exact match", "number": "final-number match", "tasks": "exact match"}


def verifier_name(match) -> str:
    """What a resume compares for a verifier: its --reward name, or a function's own name (a
    functools.partial: its function's and arguments'; a callable object: its class's). Never a
    repr with a memory address, which another process would not give again."""
    names = [name for name, fn in VERIFIERS.items() if fn is match and name != "tasks"]
    if names:
        return names[0]
    if isinstance(match, functools.partial):
        args = [*map(repr, match.args), *(f"{k}={v!r}" for k, v in match.keywords.items())]
        return f"functools.partial({', '.join([verifier_name(match.func), *args])})"
    owner = match if hasattr(match, "__qualname__") else type(match)
    return f"{owner.__module__}.{owner.__qualname__}"


def responses_per_prompt(group_size: int, algo: str) -> int:
    """--group-size as it runs: 0 is the algorithm's own (4 for GRPO, 2 for RLOO, 1 for PPO)."""
    return group_size or {"grpo": 4, "rloo": 2}.get(algo, 1)


@dataclass
class RLArgs:
    algo: str = "ppo"            # ppo | grpo | rloo
    out_dir: str = "runs/rlhf"
    iterations: int = 50
    prompts_per_iter: int = 16   # prompts per rollout batch
    group_size: int = 0          # responses per prompt; 0 = 1 for PPO, 4 for GRPO, 2 for RLOO
    max_new_tokens: int = 24
    missing_eot_penalty: float = 0.0  # taken off the score of a response cut at max_new_tokens
    temperature: float = 1.0
    top_k: int | None = None
    cuda_graphs: bool = False    # the rollouts' decode steps replayed as CUDA graphs (generate's cuda_graph)
    epochs: int = 4              # passes over each rollout batch
    minibatch_size: int = 8      # responses per gradient step
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_coef: float = 0.05        # PPO: per-token KL in the reward; GRPO: k3 KL in the loss; RLOO: summed KL in it
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # the ratio's upper clip 1 + this (None: clip_eps; DAPO's clip-higher)
    delta: float | None = None   # the unclipped ratio term's cap (None: none; INTELLECT-2's two-sided clip)
    value_clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    loss_type: str = "grpo"      # GRPO: grpo | bnpo | dr_grpo | dapo (GRPO_LOSS_TYPES)
    scale_rewards: str = "group"  # GRPO: group | batch | none
    mask_truncated: bool = False  # GRPO: responses cut at max_new_tokens left out of the loss
    importance_sampling_level: str = "token"  # GRPO: token | sequence (GSPO)
    normalize_advantages: bool = False  # RLOO: the rollout's advantages standardized
    reward_clip_range: tuple | None = None  # RLOO: (lo, hi) the score is clamped to before the KL shaping
    eval_every: int = 5          # 0 = only before and after
    eval_prompts: int = 16
    eval_samples: int = 2        # sampled responses per eval prompt
    ckpt_every: int = 10         # 0 = only at the end
    keep_ckpts: int = 3
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 1337
    kernels: str | None = "auto"
    activation_checkpointing: bool = False  # the policy's blocks recomputed in backward: less memory
    resume: str | None = None
    overwrite: bool = False      # a new run may replace the checkpoints and metrics in out_dir
    report_to: str = "none"      # none | wandb | tensorboard | a comma list (the Trainer's flags)
    run_name: str | None = None
    wandb_project: str = "tritongpt"

    @classmethod
    def from_namespace(cls, ns) -> "RLArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})

    @property
    def samples_per_prompt(self) -> int:
        return responses_per_prompt(self.group_size, self.algo)

    def _critic_flags(self) -> list:
        """PPO's value head and GAE flags given (a changed default), as "--flag value"."""
        defaults = {f.name: f.default for f in fields(self)}
        return [f"--{n.replace('_', '-')} {getattr(self, n)}" for n in ("value_clip", "vf_coef", "gamma", "lam")
                if getattr(self, n) != defaults[n]]

    def _check_rloo_flags(self):
        """RLOO's own flags (refused elsewhere), and the flags it has no use for (refused with it)."""
        if self.algo != "rloo":
            for flag, given in (("--normalize-advantages", self.normalize_advantages),
                                ("--reward-clip-range", self.reward_clip_range is not None)):
                if given:
                    raise UserError(f"{flag} is RLOO's (TRL's RLOOConfig); --algo {self.algo} does not take it")
        else:
            given = self._critic_flags()  # RLOO has no value head and no per-token returns
            if self.delta is not None:
                given.append(f"--delta {self.delta}")  # GRPO's two-sided clip: TRL's RLOO has no delta
            if given:
                raise UserError(f"{', '.join(given)}: not RLOO's (PPO's value head and GAE, GRPO's --delta); "
                                "--algo rloo has no critic and clips one ratio per response")
        if self.reward_clip_range is not None:
            r = self.reward_clip_range
            if len(r) != 2 or not all(math.isfinite(x) for x in r) or not r[0] < r[1]:
                raise UserError(f"--reward-clip-range must be two finite numbers LO < HI, got "
                                f"{' '.join(map(str, r))}")

    def validate(self):
        if self.algo not in ALGOS:
            raise UserError(f"--algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        for name in ("iterations", "prompts_per_iter", "max_new_tokens", "epochs", "minibatch_size",
                     "eval_prompts", "eval_samples"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name, value, choices in (("loss_type", self.loss_type, GRPO_LOSS_TYPES),
                                     ("scale_rewards", self.scale_rewards, SCALE_REWARDS),
                                     ("importance_sampling_level", self.importance_sampling_level,
                                      IMPORTANCE_SAMPLING_LEVELS)):
            flag = "--" + name.replace("_", "-")
            if value not in choices:
                raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
            if self.algo == "ppo" and value != choices[0]:
                raise UserError(f"{flag} {value} is GRPO's; PPO's advantages come from GAE and whitening")
            if self.algo == "rloo" and value != choices[0]:
                raise UserError(f"{flag} {value} is GRPO's; RLOO's advantages are leave-one-out, and its loss is "
                                "the mean over responses of one sequence-level ratio each (TRL's RLOOTrainer)")
        self._check_rloo_flags()
        if self.algo == "grpo" and self._critic_flags():  # they would do nothing: GRPO has no critic
            raise UserError(f"{', '.join(self._critic_flags())}: PPO's value head and GAE; --algo grpo has no critic "
                            "(a response's advantage is its score against its group's)")
        if self.algo == "ppo" and self.mask_truncated:
            raise UserError("--mask-truncated is GRPO's: PPO's value head learns the returns of the cut responses, "
                            "and their per-token KL penalties are in its rewards (use --missing-eot-penalty)")
        if self.clip_eps_high is not None and not (math.isfinite(self.clip_eps_high) and self.clip_eps_high > 0):
            raise UserError(f"--clip-eps-high must be a finite number > 0, got {self.clip_eps_high}")
        if self.algo == "rloo" and self.samples_per_prompt < 2:  # first: a negative size is RLOO's error too
            raise UserError(f"--group-size must be >= 2 for RLOO (a response's baseline is the mean of the other "
                            f"responses to its prompt), got {self.group_size}")
        if self.group_size < 0 or (self.algo == "grpo" and self.samples_per_prompt < 2):
            raise UserError(f"--group-size must be >= 2 for GRPO (a group needs a spread), got {self.group_size}")
        for name in ("kl_coef", "clip_eps", "value_clip", "vf_coef", "ent_coef", "weight_decay",
                     "grad_clip", "eval_every", "ckpt_every", "keep_ckpts", "missing_eot_penalty"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("kl_coef", "clip_eps", "value_clip", "vf_coef", "ent_coef", "weight_decay", "grad_clip",
                     "missing_eot_penalty", "lr"):  # nan passes `< 0`, and nan or inf makes the loss nan
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if self.delta is not None:
            # a cap at or below the upper clip bound 1 + eps_high would flatten the surrogate of a token with A > 0
            # before the clip does (clip-higher undone) and, at <= 1, where the ratio has not moved at all.
            # TRL only recommends delta > 1 + epsilon; a value that breaks the clip is refused here.
            high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
            which = "--clip-eps-high" if self.clip_eps_high is not None else "--clip-eps-high (unset: --clip-eps)"
            if not (math.isfinite(self.delta) and self.delta > 1 + high):
                raise UserError(f"--delta must be a finite number > 1 + {which} = {1 + high:g}, got {self.delta}: "
                                "it caps the unclipped ratio term above the ratio's upper clip bound")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise UserError(f"--gamma and --lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 for sampling rollouts, got {self.temperature}")
        from tritongpt.train.generate import check_sampling

        check_sampling(self.temperature, self.top_k, flags=True)
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        common.check_seed(self.seed)
        common.check_dtype(self.dtype)
        common.check_tracking(self)


def check_one_process():
    """RLHF has no DDP: under torchrun every process would train its own copy and write the same --out-dir."""
    world = common.dist_env()[2]
    if world > 1:
        raise UserError(f"rlhf runs in one process, not under torchrun (WORLD_SIZE={world}): each process "
                        "would train a copy of its own and write the same --out-dir; run it without torchrun")


class PolicyWithValue(nn.Module):
    """The policy (a GPTModel) and, for PPO, a value head reading the same hidden states."""

    def __init__(self, policy: GPTModel, value_head: bool = True):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.n_embd, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no made-up baseline
            nn.init.zeros_(self.value_head.bias)

    def forward(self, idx):
        """Logits [B, T, V] and values [B, T-1] (value of the state before each target), or None."""
        h = self.policy.hidden(idx)
        logits = self.policy.logits(h)
        values = None if self.value_head is None else self.value_head(h[:, :-1]).squeeze(-1).float()
        return logits, values

    def logprobs(self, idx, temperature: float = 1.0, entropy: bool = False, entropy_grad: bool = True):
        """(logp [B, T-1], entropy [B, T-1] or None, values [B, T-1] or None) from one trunk forward: the
        policy's GPTModel.token_logprobs (on the Triton path the loss kernel, no [B, T-1, V] fp32 log-softmax)
        on the hidden states the value head reads."""
        h = self.policy.hidden(idx)
        logp, ent = self.policy.token_logprobs(idx, temperature, entropy, hidden=h, entropy_grad=entropy_grad)
        values = None if self.value_head is None else self.value_head(h[:, :-1]).squeeze(-1).float()
        return logp, ent, values


# -- rollouts ------------------------------------------------------------------------------------
@dataclass
class Rollout:
    idx: torch.Tensor          # [N, T] prompt + response, right-padded with eot
    prompt_lens: torch.Tensor  # [N]
    lengths: torch.Tensor      # [N] prompt + response (through the first eot, if any)
    mask: torch.Tensor         # [N, T-1] bool: targets that are response tokens
    group: torch.Tensor        # [N] index of the prompt each response answers
    scores: torch.Tensor = None     # [N] reward model (several: the weighted sum)
    logp: torch.Tensor = None       # [N, T-1] log pi_old of each target
    ref_logp: torch.Tensor = None   # [N, T-1] log pi_ref
    values: torch.Tensor = None     # [N, T-1] PPO
    advantages: torch.Tensor = None  # [N, T-1]
    returns: torch.Tensor = None    # [N, T-1] PPO
    judge_scores: torch.Tensor = None  # [N, judges] each judge's own score (a WeightedReward's)
    truncated: torch.Tensor = None  # [N] bool: max_new_tokens cut the response before its eot (--mask-truncated)
    rewards: torch.Tensor = None    # [N] RLOO: the shaped reward, score - kl_coef * the response's summed KL
    seq_advantages: torch.Tensor = None  # [N] RLOO: one advantage per response
    penalty: torch.Tensor = None    # [N] the --missing-eot-penalty in scores (RLOO clamps the score without it)

    def __len__(self):
        return self.idx.size(0)

    def ended(self, eot_id: int) -> torch.Tensor:
        """[N] bool: the response ends with end-of-text (else max_new_tokens cut it)."""
        last = self.idx[torch.arange(len(self), device=self.idx.device), self.lengths - 1]
        return (last == eot_id) & (self.lengths > self.prompt_lens)


@torch.no_grad()
def sample_responses(policy: GPTModel, prompts: list, n_samples: int, max_new_tokens: int, eot_id: int,
                     temperature: float = 1.0, top_k=None, generator=None, cuda_graph: bool = False) -> Rollout:
    """n_samples responses per prompt (token lists), generated with the KV cache.

    The model has no attention mask, so prompts of equal length are batched together and
    each batch is generated at once; responses end at their first eot (kept, it is an
    action) or after max_new_tokens. cuda_graph: generate's (each decode step a CUDA-graph replay).
    """
    device = policy.tok_emb.weight.device
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    seqs, prompt_lens, groups = [], [], []
    for P in sorted(by_len):
        ids = by_len[P]
        rows = [prompts[i] for i in ids for _ in range(n_samples)]
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        out = generate(policy, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                       eos_id=eot_id, generator=generator, cuda_graph=cuda_graph).tolist()
        for r, row in enumerate(out):
            resp = row[P:]
            if eot_id in resp:
                resp = resp[:resp.index(eot_id) + 1]
            seqs.append(row[:P] + resp)
            prompt_lens.append(P)
            groups.append(ids[r // n_samples])
    order = sorted(range(len(seqs)), key=lambda k: groups[k])  # back to prompt order
    seqs = [seqs[k] for k in order]
    idx, lengths = pad_sequences(seqs, eot_id, device)
    prompt_lens = torch.tensor([prompt_lens[k] for k in order], device=device)
    group = torch.tensor([groups[k] for k in order], device=device)
    ro = Rollout(idx, prompt_lens, lengths, response_mask(prompt_lens, lengths, idx.size(1)), group)
    ro.truncated = ~ro.ended(eot_id)
    return ro


def masked_mean(x, mask, dim=None):
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x, mask):
    """The sample variance (Bessel's n - 1, n the mask's count) of x where mask is set, as TRL's masked_var
    (unbiased=True). One value: 0, not TRL's 0/0 (NaN): its centered value is 0, so it whitens to 0, as a lone GRPO
    response's advantage (group_advantages)."""
    m = mask.to(x.dtype)
    centered = (x - masked_mean(x, mask)) * m
    return (centered ** 2).sum() / (m.sum() - 1).clamp_min(1)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the positions mask sets, 0 elsewhere: TRL's masked_whiten, its variance
    the sample one (masked_var; the population one made every advantage sqrt(n / (n - 1)) larger)."""
    mean = masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(masked_var(x, mask) + eps) * mask


def logprobs_and_entropy(logits, idx, entropy_grad: bool, temperature: float = 1.0):
    """token_logprobs(logits, idx, temperature) and each position's entropy [B, T-1], from ONE
    log_softmax of given logits: its [B, T-1, vocab] fp32 output is the biggest tensor of an update step, which
    is why the update goes through PolicyWithValue.logprobs instead (GPTModel.token_logprobs: on the reference
    path this same math, on the Triton path the loss kernel)."""
    logp_all = next_token_logprobs(logits, temperature)
    logp = pick_next_tokens(logp_all, idx)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_of(logp_all, logits[:, :-1])
    return logp, entropy


def policy_logprobs(model, idx, temperature: float, entropy: bool = False, entropy_grad: bool = True):
    """(logp, entropy or None, values or None) [B, T-1] each: PolicyWithValue.logprobs (one trunk forward, on the
    Triton path the loss kernel), or for any other module whose forward(idx) gives PolicyWithValue's (logits,
    values), logprobs_and_entropy of those logits."""
    if isinstance(model, PolicyWithValue):
        return model.logprobs(idx, temperature, entropy, entropy_grad)
    logits, values = model(idx)
    logp, ent = logprobs_and_entropy(logits, idx, entropy_grad, temperature)
    return logp, ent if entropy else None, values


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation over the response tokens of each row.

    rewards, values, mask: [N, T-1]; the response is one contiguous run of mask. The value
    after the last response token is 0 (the episode ends). Returns (advantages, returns).
    """
    m = mask.to(values.dtype)
    values = values * m
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        nxt_m = m[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last)
        nxt_v = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt_v * nxt_m - values[:, t]
        last = delta + gamma * lam * nxt_m * last
        adv[:, t] = last * m[:, t]
    return adv, (adv + values) * m


def by_group(group, dtype):
    """(member [N]: each row's group, n [G]: each group's size in dtype, sum(x) -> [G]: x's sum over each group)."""
    _, member, counts = group.unique(return_inverse=True, return_counts=True)
    n = counts.to(dtype)
    return member, n, lambda x: torch.zeros_like(n).index_add_(0, member, x)


def group_advantages(scores, group, eps: float = 1e-4, scale: str = "group"):
    """(r - mean) / (std + eps) within each prompt's group of responses: [N]. scale: whose std divides (group:
    the group's; batch: all the scores'; none: no division, r - mean alone). The std is the sample one (n - 1), as
    TRL's torch.std: the population one would make every advantage sqrt(n / (n - 1)) larger (1.15x at n = 4)."""
    member, n, total = by_group(group, scores.dtype)
    centered = scores - (total(scores) / n)[member]
    if scale == "none":
        return centered
    if scale == "batch":  # (a rollout of one: std 0, as TRL's, where torch.std of one value is NaN)
        return centered / ((scores.std() if scores.numel() > 1 else 0) + eps)
    std = (total(centered ** 2) / (n - 1).clamp_min(1)).sqrt()  # a lone response: std 0, advantage 0
    return centered / (std[member] + eps)


def rloo_advantages(rewards, group, normalize: bool = False, eps: float = 1e-4):
    """Each reward minus the mean of the OTHER rewards of its prompt's group: [N] (RLOO, TRL's RLOOTrainer);
    every group needs >= 2 members. normalize: then (A - mean) / (std + eps) over all N, std unbiased (TRL's)."""
    member, n, total = by_group(group, rewards.dtype)
    if int(n.min()) < 2:
        raise ValueError("RLOO needs >= 2 responses per prompt: a response's baseline is the others' mean")
    adv = rewards - (total(rewards)[member] - rewards) / (n[member] - 1)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + eps)
    return adv


def rloo_rewards(ro: "Rollout", kl_coef: float, clip_range=None):
    """[N] TRL RLOOTrainer's shaped rewards: the score (clamped to clip_range), minus kl_coef times the response's
    KL estimate, the sum over its tokens of log pi_old - log pi_ref (sampled from pi_old: its mean is the KL).
    The clamp is the judge's score's: --missing-eot-penalty (ro.penalty) comes off after it, as the KL does, or
    the clamp would take back the penalty of a cut response scored near LO (all of it at LO or below)."""
    scores = ro.scores
    if clip_range is not None:
        pen = 0.0 if ro.penalty is None else ro.penalty
        scores = (scores + pen).clamp(clip_range[0], clip_range[1]) - pen
    kl = ((ro.logp - ro.ref_logp) * ro.mask).sum(1)
    return scores - kl_coef * kl


class TaskReward(nn.Module):
    """A verifier in the reward model's place (RL with verifiable rewards, as DeepSeek-R1-Zero's
    rule-based accuracy reward and TRL's GRPO reward functions): 1 for a response that matches
    its prompt's answer, else 0. The response is the text before end-of-text, or all of it where
    max_new_tokens cut it, as SFT's exact match reads it. `answers` maps each prompt's token ids
    to its answer, or to a tuple of answers where a file gives one prompt several (any of them
    is right); `match(response, answer)` is tasks.exact_match (equal after stripping) unless
    given. The scores are exact, so eval_reward is the held-out match rate."""

    def __init__(self, tokenizer, answers: dict, config, match=tasks.exact_match, end_id: int | None = None):
        super().__init__()
        self.tokenizer, self.match = tokenizer, match
        self.end_id = tokenizer.eot_id if end_id is None else end_id  # a chat template's end of turn
        self.answers = {k: (v,) if isinstance(v, str) else tuple(v) for k, v in answers.items()}
        self.config = copy.copy(config)  # the policy's: cmd_rlhf compares the vocabulary and context

    def set_kernels(self, kernels):
        pass  # no network to run

    def forward(self, idx, lengths, prompt_lens):
        eot, out = self.end_id, []
        for row, start, end in zip(idx.tolist(), prompt_lens.tolist(), lengths.tolist()):
            response = row[start:end]
            if eot in response:
                response = response[:response.index(eot)]
            golds = self.answers.get(tuple(row[:start]))
            if golds is None:
                raise UserError("the task verifier got a prompt it has no answer for")
            text = self.tokenizer.decode(response)
            out.append(float(any(self.match(text, gold) for gold in golds)))
        return torch.tensor(out, device=idx.device)


def check_reward_weights(n: int, weights) -> list:
    """--reward-weights as floats, one per --reward (None: all 1.0, TRL's default); a count of
    another length, a non-finite weight or all of them 0 is a UserError naming the flag."""
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UserError(f"--reward-weights has {len(weights)} weight{'s' * (len(weights) != 1)} for {n} --reward "
                        f"judge{'s' * (n != 1)}: give one weight per --reward, in their order")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise UserError(f"--reward-weights must be finite numbers, got {bad[0]}")
    if not any(weights):
        raise UserError(f"--reward-weights are all 0 ({' '.join(f'{w:g}' for w in weights)}): the weighted sum "
                        "would be 0 for every response, nothing to optimise; give at least one judge a weight")
    return weights


def judge_key(judge, i: int) -> str:
    """The short name of the i-th judge (0-based) in logged keys: a built-in verifier's --reward name,
    else verifier<i+1> (a verifier of one's own) or rm<i+1> (a reward model), i+1 its place among --reward."""
    if isinstance(judge, TaskReward):
        name = verifier_name(judge.match)
        return name if name in VERIFIERS else f"verifier{i + 1}"
    return f"rm{i + 1}"


class WeightedReward(nn.Module):
    """Several judges as one: a response's score is sum_i weights[i] * judges[i]'s score (TRL's
    reward_funcs with reward_weights). `judges`: reward models and TaskRewards; `keys` name each in
    the logged reward_<key> (default judge_key's, made unique by their place); `labels` name each
    in messages (cmd_rlhf: the --reward values). scores() gives every judge's own scores, combine()
    their weighted sum; a weight of 0 keeps its judge scored and logged, out of the sum."""

    def __init__(self, judges, weights=None, keys=None, labels=None):
        super().__init__()
        self.judges = nn.ModuleList(judges)
        self.weights = check_reward_weights(len(self.judges), weights)
        if keys is None:
            keys = []
            for i, judge in enumerate(self.judges):
                key = judge_key(judge, i)
                keys.append(key if key not in keys else f"{key}{i + 1}")
        self.keys, self.labels = list(keys), list(labels or keys)

    def set_kernels(self, kernels):
        for judge in self.judges:
            judge.set_kernels(kernels)

    def learned(self) -> bool:
        """A reward model (not a verifier) counts in the sum: PPO normalizes the scores then."""
        return any(w and not isinstance(j, TaskReward) for j, w in zip(self.judges, self.weights))

    def scores(self, idx, lengths, prompt_lens) -> torch.Tensor:
        """[N, judges]: each judge's own score of each response."""
        return torch.stack([judge_scores(j, idx, lengths, prompt_lens) for j in self.judges], dim=1)

    def combine(self, scores) -> torch.Tensor:
        """[N]: sum_i w_i * scores[:, i]."""
        total = torch.zeros_like(scores[:, 0])
        for i, w in enumerate(self.weights):
            total = total + w * scores[:, i]
        return total

    def forward(self, idx, lengths, prompt_lens):
        return self.combine(self.scores(idx, lengths, prompt_lens))


def judges_of(reward_model) -> list:
    return list(reward_model.judges) if isinstance(reward_model, WeightedReward) else [reward_model]


def judge_scores(judge, idx, lengths, prompt_lens) -> torch.Tensor:
    """One judge's scores [N] (float): a verifier reads the prompts, a reward model the sequences."""
    return judge(idx, lengths, prompt_lens) if isinstance(judge, TaskReward) else judge(idx, lengths).float()


@torch.no_grad()
def score_rollout(ro: Rollout, model: PolicyWithValue, ref: GPTModel, reward_model, temperature: float = 1.0,
                  chunk: int = 32) -> Rollout:
    """Fill in the reward model's scores, old and reference log-probs (both at the sampling
    temperature), and values (PPO). A WeightedReward's scores are the weighted sums, and
    ro.judge_scores [N, judges] every judge's own."""
    logp, ref_logp, values, scores, per_judge = [], [], [], [], []
    for i in range(0, len(ro), chunk):
        idx, lengths = ro.idx[i:i + chunk], ro.lengths[i:i + chunk]
        lp, _, v = policy_logprobs(model, idx, temperature)
        logp.append(lp)
        # each model's own path: on the Triton path the LM head fused with the loss kernel, no logits kept
        ref_logp.append(ref.token_logprobs(idx, temperature)[0])
        if v is not None:
            values.append(v)
        if isinstance(reward_model, WeightedReward):
            per_judge.append(reward_model.scores(idx, lengths, ro.prompt_lens[i:i + chunk]))
            scores.append(reward_model.combine(per_judge[-1]))
        else:
            scores.append(judge_scores(reward_model, idx, lengths, ro.prompt_lens[i:i + chunk]))
    ro.logp, ro.ref_logp, ro.scores = torch.cat(logp), torch.cat(ref_logp), torch.cat(scores)
    ro.judge_scores = torch.cat(per_judge) if per_judge else None
    ro.values = torch.cat(values) if values else None
    return ro


def compute_advantages(ro: Rollout, args: RLArgs, score_norm=(0.0, 1.0)) -> Rollout:
    """PPO: per-token rewards, GAE, whitening; GRPO: group-standardized scores on every token; RLOO: the
    leave-one-out advantages of the KL-shaped rewards (rloo_rewards, rloo_advantages), on every token.

    PPO's score enters the reward as (score - shift) / scale with score_norm = (shift, scale),
    fixed from the first batch of the initial policy (Ziegler et al. 2019 normalize the reward
    model the same way), so the value head starts near its targets whatever the reward
    model's offset. Logged rewards are always the raw scores.

    Several judges (WeightedReward): ro.scores is already their weighted sum, and it is what both
    algorithms see. PPO normalizes that sum as it would one reward model's score when a reward model
    with a nonzero weight is among the judges, and leaves it as it is (0, 1) when only verifiers count
    (their 0/1 scores need none, and an all-wrong first batch would divide by a floor of 1e-3). The sum
    is normalized, not each judge apart: the weights then set the judges' trade-off in their own units
    for PPO as for GRPO (and TRL), and the logged reward stays an affine image of what PPO optimises.
    """
    m = ro.mask.float()
    if args.algo == "ppo":
        rewards = -args.kl_coef * (ro.logp - ro.ref_logp) * m
        last = ro.lengths - 2  # target index of the final response token
        shift, scale = score_norm
        rewards[torch.arange(len(ro), device=rewards.device), last] += (ro.scores - shift) / scale
        adv, ro.returns = gae(rewards, ro.values, ro.mask, args.gamma, args.lam)
        ro.advantages = masked_whiten(adv, ro.mask)
    elif args.algo == "rloo":
        ro.rewards = rloo_rewards(ro, args.kl_coef, args.reward_clip_range)
        ro.seq_advantages = rloo_advantages(ro.rewards, ro.group, args.normalize_advantages)
        ro.advantages = ro.seq_advantages.unsqueeze(1) * m
    else:
        ro.advantages = group_advantages(ro.scores, ro.group, scale=args.scale_rewards).unsqueeze(1) * m
    return ro


def grpo_aggregate(per_token, mask, loss_type: str, max_new_tokens: int, kept=None, n_rollout=None):
    """A minibatch's per-token losses [B, T-1] as one (GRPO_LOSS_TYPES). kept [B] bool (--mask-truncated): the
    responses that count, as if the others were not in the minibatch (mask is already False on theirs); none
    kept gives 0. dapo: the sum / n_rollout, the rollout's response tokens per minibatch (minibatch_loss's)."""
    if loss_type == "dapo":
        if n_rollout is None:
            raise ValueError("the dapo loss needs n_rollout, the rollout's response tokens per minibatch")
        return (per_token * mask).sum() / n_rollout
    if kept is None:
        n = per_token.size(0)
        if loss_type == "grpo":
            return masked_mean(per_token, mask, dim=1).mean()  # token mean per response, then mean
    else:
        n = kept.sum().clamp_min(1)
        if loss_type == "grpo":
            return masked_mean(per_token, mask, dim=1).sum() / n  # a dropped response's token mean is 0
    if loss_type == "bnpo":
        return masked_mean(per_token, mask)
    return (per_token * mask).sum() / (n * max_new_tokens)  # dr_grpo


def minibatch_loss(model: PolicyWithValue, ro: Rollout, sel, args: RLArgs):
    """The loss of one minibatch (indices sel into the rollout) and its statistics."""
    idx, mask = ro.idx[sel], ro.mask[sel]
    kept, n_rollout = None, None
    if args.loss_type == "dapo":
        # TRL's num_items_in_batch: every response token of the rollout (the whole generation batch; rlhf runs
        # in one process, check_one_process, so there is no other rank's count to all-reduce), counted BEFORE
        # --mask-truncated masks the cut responses (TRL counts it before masking them too: their tokens stay in
        # the divisor, out of the sum), over the minibatches one epoch takes (TRL: optimizer steps per generation)
        n_rollout = ro.mask.sum().clamp_min(1) / math.ceil(len(ro) / args.minibatch_size)
    if args.mask_truncated:  # GRPO: the cut responses' tokens leave the loss (and the statistics of it)
        if ro.truncated is None:
            raise ValueError("mask_truncated needs the rollout's truncated responses (sample_responses fills them)")
        kept = ~ro.truncated[sel]
        mask = mask & kept.unsqueeze(1)
    logp, entropy, values = policy_logprobs(model, idx, args.temperature, entropy=True,
                                            entropy_grad=bool(args.ent_coef))
    # a mixture of experts' load-balancing loss over this forward (the reference's log-probs come with the
    # rollout): without it the policy's routers train with nothing to keep their load even
    aux = common.moe_aux_term(model, common.length_mask(ro.lengths[sel], idx.size(1)))  # pads left out
    entropy = masked_mean(entropy, mask)
    old_logp, adv = ro.logp[sel], ro.advantages[sel]
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    if args.algo == "rloo":
        return with_aux(*rloo_loss(log_ratio, ratio, mask, ro.seq_advantages[sel], kept, entropy, args), aux)
    is_ratio = ratio  # the ratio the surrogate clips
    if args.importance_sampling_level == "sequence":  # GSPO: each response's mean log-ratio, on all its tokens
        seq = log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
        is_ratio = torch.exp(seq).expand_as(log_ratio)
    high = args.clip_eps if args.clip_eps_high is None else args.clip_eps_high
    # --delta (TRL's, INTELLECT-2's two-sided clip): the UNCLIPPED term's ratio is capped at delta, at either
    # importance-sampling level, as TRL clamps coef_1 (its ratio) before the min. With A < 0 a ratio far above 1
    # otherwise gives an unbounded loss -A r and gradient; with A > 0 the clipped term (<= 1 + high < delta) wins.
    capped = is_ratio if args.delta is None else is_ratio.clamp(max=args.delta)
    pg = torch.maximum(-adv * capped, -adv * is_ratio.clamp(1 - args.clip_eps, 1 + high))
    with torch.no_grad():
        if args.clip_eps_high is None:
            clipped = (is_ratio - 1).abs() > args.clip_eps
        else:
            clipped = (is_ratio < 1 - args.clip_eps) | (is_ratio > 1 + high)
        # TRL's sign-aware clip statistics: the tokens whose gradient the clip actually stops, below the lower
        # bound with A < 0 and above the upper one with A > 0 (clip_frac counts every ratio outside the bounds).
        # Per token as clip_frac, also at the sequence level (TRL there takes the mean over responses).
        low_stop = (is_ratio < 1 - args.clip_eps) & (adv < 0)
        high_stop = (is_ratio > 1 + high) & (adv > 0)
        stats = {"entropy": entropy.item(),
                 "clip_frac": masked_mean(clipped.float(), mask).item(),
                 "clip_frac_low": masked_mean(low_stop.float(), mask).item(),
                 "clip_frac_high": masked_mean(high_stop.float(), mask).item(),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item()}
    if args.algo == "ppo":
        policy_loss = masked_mean(pg, mask)
        old_v, ret = ro.values[sel], ro.returns[sel]
        v_clipped = old_v + (values - old_v).clamp(-args.value_clip, args.value_clip)
        value_loss = 0.5 * masked_mean(torch.maximum((values - ret) ** 2, (v_clipped - ret) ** 2), mask)
        loss = policy_loss + args.vf_coef * value_loss
        stats["value_loss"] = value_loss.item()
    else:
        # k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased for KL(pi || pi_ref)
        # zero outside the response first: exp of a prompt or padding position's difference
        # could overflow, and inf * 0 in the masked mean (or its gradient) is NaN
        d = torch.where(mask, ro.ref_logp[sel] - logp, 0.0)
        k3 = torch.exp(d) - d - 1
        per_token = pg + args.kl_coef * k3
        policy_loss = masked_mean(pg, mask)
        loss = grpo_aggregate(per_token, mask, args.loss_type, args.max_new_tokens, kept, n_rollout)
        stats["kl_k3"] = masked_mean(k3, mask).item()
    if args.ent_coef:
        loss = loss - args.ent_coef * entropy
    stats["policy_loss"] = policy_loss.item()
    stats["loss"] = loss.item()
    if kept is not None and not bool(kept.any()):
        # no kept token to measure: these are left out of update()'s means rather than logged as 0s
        for k in ("entropy", "clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "kl_k3", "policy_loss"):
            stats.pop(k, None)
    return with_aux(loss, stats, aux)


def with_aux(loss, stats, aux):
    """(loss + aux, stats with the logged loss so, and moe_aux: what of it is the routers' balance): aux is
    common.moe_aux_term's, None for none (then no moe_aux)."""
    if aux is None:
        return loss, stats
    loss = loss + aux
    return loss, {**stats, "loss": loss.item(), "moe_aux": aux.item()}


def rloo_loss(log_ratio, ratio, mask, adv, kept, entropy, args: RLArgs):
    """TRL RLOOTrainer._compute_loss: one ratio per response, r = exp(sum over its tokens of log pi - log pi_old),
    the clipped surrogate max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high)), and its mean over the
    minibatch's responses. log_ratio [B, T-1] is zero off the kept response tokens; adv [B]; kept [B] or None
    (--mask-truncated: a cut response adds 0 and stays in the divisor, as its ratio-1, gradient-free term in TRL's
    mean). The clip statistics are per response, over the kept ones, as TRL's clip_ratio/*."""
    r = torch.exp(log_ratio.sum(1))
    high = args.clip_eps if args.clip_eps_high is None else args.clip_eps_high
    per_seq = torch.maximum(-adv * r, -adv * r.clamp(1 - args.clip_eps, 1 + high))
    keep = torch.ones_like(adv, dtype=torch.bool) if kept is None else kept
    loss = policy_loss = (per_seq * keep).mean()
    with torch.no_grad():
        k = keep.float()
        n = k.sum().clamp_min(1)
        low_stop, high_stop = (r < 1 - args.clip_eps) & (adv < 0), (r > 1 + high) & (adv > 0)
        stats = {"entropy": entropy.item(),
                 "clip_frac": (((r < 1 - args.clip_eps) | (r > 1 + high)).float() * k).sum().item() / n.item(),
                 "clip_frac_low": (low_stop.float() * k).sum().item() / n.item(),
                 "clip_frac_high": (high_stop.float() * k).sum().item() / n.item(),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
                 "policy_loss": policy_loss.item()}
    if args.ent_coef:
        loss = loss - args.ent_coef * entropy
    stats["loss"] = loss.item()
    if not bool(keep.any()):
        for key in ("entropy", "clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "policy_loss"):
            stats.pop(key)
    return loss, stats


def rloo_stats(ro: Rollout) -> dict:
    """TRL RLOOTrainer's kl (the per-token mean of log pi - log pi_ref over every response token) and
    frac_reward_zero_std (the share of prompts whose shaped rewards have a std of 0: all their advantages are 0)."""
    member, n, total = by_group(ro.group, ro.rewards.dtype)
    std = (total((ro.rewards - (total(ro.rewards) / n)[member]) ** 2) / (n - 1)).sqrt()
    return {"kl_token": masked_mean(ro.logp - ro.ref_logp, ro.mask).item(),
            "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean().item()}


# -- the trainer ---------------------------------------------------------------------------------
class RLHFTrainer:
    """PPO, GRPO or RLOO on `policy`, with `ref` frozen and `reward_model` as the only judge (several judges:
    a WeightedReward, whose weighted sum is the score; their list and weights go into the run record).

    prompts / eval_prompts: lists of token-id lists (each leaves room for max_new_tokens).
    `history` keeps every logged row; `fit()` returns a summary with the first and last eval.
    run_args: the data flags (--data, ...), saved with the RLArgs and named by a resume that changes them.
    """

    def __init__(self, policy: GPTModel, ref: GPTModel, reward_model, prompts, eval_prompts, eot_id: int,
                 args: RLArgs, log: bool = True, run_args: dict | None = None, prompt_format: str | None = None):
        args.validate()
        check_one_process()
        self.args, self.eot_id, self.log_enabled = args, eot_id, log
        self.run_args = dict(run_args or {})
        if isinstance(reward_model, TaskReward):  # built in Python: the verifier is still the run's judge
            self.run_args.setdefault("verifier", verifier_name(reward_model.match))
        if isinstance(reward_model, WeightedReward):  # several judges: their list and weights, in --reward order
            self.run_args.setdefault("rewards", [verifier_name(j.match) if isinstance(j, TaskReward) else None
                                                 for j in reward_model.judges])
            self.run_args.setdefault("reward_weights", list(reward_model.weights))
        self.prompt_format = prompt_format  # saved for `tritongpt chat` (the Trainer's doc)
        self.device = common.pick_device(args.device)
        self.dtype = common.pick_dtype(args.dtype, self.device)
        if args.cuda_graphs:  # a policy no graph replays (LongRoPE, experts), by name before the rollouts
            check_graphable(policy)
        if args.cuda_graphs and self.device.type != "cuda":
            raise UserError(f"--cuda-graphs replays the rollouts' decode steps as CUDA graphs: it needs a CUDA "
                            f"device, the run is on {self.device.type}")
        self.scaler = common.LossScaler(self.device, self.dtype)
        ctx = policy.config.context_length
        for name, ps in (("prompts", prompts), ("eval prompts", eval_prompts)):
            if not ps:
                raise UserError(f"no {name} fit in the context ({ctx} tokens) with "
                                f"--max-new-tokens {args.max_new_tokens}")
            too_long = [len(p) for p in ps if len(p) + args.max_new_tokens > ctx or not p]
            if too_long:
                raise UserError(f"{len(too_long)} {name} do not leave room for {args.max_new_tokens} "
                                f"new tokens in the context of {ctx}")
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.model = PolicyWithValue(policy, value_head=args.algo == "ppo").to(self.device)
        self.ref = ref.to(self.device).eval().requires_grad_(False)
        self.reward_model = reward_model.to(self.device).eval().requires_grad_(False)
        if args.kernels is not None:
            for m in (policy, self.ref, self.reward_model):
                m.set_kernels(args.kernels)
        if args.activation_checkpointing:  # the frozen models record no gradients: nothing to recompute
            policy.set_activation_checkpointing(True)
        if log:
            common.note_slow_kernels([policy, self.ref, *judges_of(self.reward_model)], self.device)
        # dropout would make log pi at update time differ from log pi at rollout time
        self.model.eval()
        self.optimizer = common.build_optimizer(self.model, args.lr, args.weight_decay, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed)
        self.shuffle_gen = torch.Generator().manual_seed(args.seed + 1)
        self.out_dir = Path(args.out_dir)
        self._clear_first = common.check_out_dir(self.out_dir, args.resume, args.overwrite)
        # frozen: fingerprinted once, saved with every checkpoint, compared on --resume
        self.frozen_fingerprints = {"ref_fingerprint": common.weights_fingerprint(self.ref),
                                    "reward_fingerprint": common.weights_fingerprint(self.reward_model)}
        if isinstance(self.reward_model, WeightedReward):  # each judge's too, to name the one that differs
            self.frozen_fingerprints["reward_fingerprints"] = [common.weights_fingerprint(j)
                                                               for j in self.reward_model.judges]
        self.checkpointer = common.Checkpointer(self.out_dir, keep=args.keep_ckpts)
        config = {"trainer": f"rlhf-{args.algo}", **vars(args), **self.run_args, "model": policy.config.to_dict()}
        self.metrics = common.MetricsLog(self.out_dir / "metrics.jsonl", enabled=log,
                                         trackers=common.trackers_for(args, config) if log else None)
        self.plot_path = self.out_dir / "rlhf.png"
        self._plotted = None  # the rows rlhf.png shows (common.replot's)
        self.iteration = 0
        self.history = []
        self.score_norm = None  # (shift, scale) of PPO's scores, from the first rollout

    @property
    def policy(self) -> GPTModel:
        return self.model.policy

    def _autocast(self):
        return common.autocast(self.device, self.dtype)

    # -- one iteration -------------------------------------------------------------------------
    def rollout(self) -> Rollout:
        a = self.args
        pick = torch.randint(len(self.prompts), (a.prompts_per_iter,), generator=self.shuffle_gen).tolist()
        with self._autocast():
            ro = sample_responses(self.policy, [self.prompts[i] for i in pick], a.samples_per_prompt,
                                  a.max_new_tokens, self.eot_id, a.temperature, a.top_k, self.generator,
                                  a.cuda_graphs)
            score_rollout(ro, self.model, self.ref, self.reward_model, a.temperature)
        if a.missing_eot_penalty:
            # A cut response is scored by the reward model at a token where no answer it was
            # trained on ends; the penalty teaches the policy to finish ("The N implementation
            # details of RLHF with PPO", Huang et al. 2022; TRL's missing_eos_penalty). It is part
            # of the training score, from the first batch's normalization on.
            ro.penalty = a.missing_eot_penalty * (~ro.ended(self.eot_id)).float()
            ro.scores = ro.scores - ro.penalty
        if self.score_norm is None and (isinstance(self.reward_model, TaskReward) or (
                isinstance(self.reward_model, WeightedReward) and not self.reward_model.learned())):
            # 0 or 1 already; a first batch all wrong (std 0) would otherwise scale by 1 / 1e-3
            self.score_norm = (0.0, 1.0)
        if self.score_norm is None:
            std = ro.scores.std().item() if len(ro) > 1 else 1.0
            self.score_norm = (ro.scores.mean().item(), max(std, 1e-3))
        return compute_advantages(ro, a, self.score_norm)

    def update(self, ro: Rollout) -> dict:
        """a.epochs passes of minibatch steps over the rollout; the mean of each statistic (the
        gradient norm's over the steps taken; `skipped`, with fp16, the fraction overflowed)."""
        a = self.args
        totals, counts = {}, {}
        self.update_log = []  # every minibatch's statistics, in order
        for _ in range(a.epochs):
            order = torch.randperm(len(ro), generator=self.shuffle_gen).to(ro.idx.device)
            for i in range(0, len(ro), a.minibatch_size):
                sel = order[i:i + a.minibatch_size]
                with self._autocast():
                    loss, stats = minibatch_loss(self.model, ro, sel, a)
                if not math.isfinite(stats["loss"]):
                    raise UserError(f"rlhf: loss is {stats['loss']} at iteration {self.iteration + 1}; "
                                    "stopped (try a lower --lr)")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.backward(loss)
                self.scaler.unscale(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                      a.grad_clip if a.grad_clip > 0 else float("inf")).item()
                skipped = self.scaler.skips(norm)  # fp16 overflow: the scaler skips this step
                if not math.isfinite(norm) and not skipped:
                    raise UserError(f"rlhf: gradient norm is {norm} at iteration {self.iteration + 1}"
                                    f"{self.scaler.why()}; stopped (try a lower --lr)")
                if not skipped:
                    stats["grad_norm"] = norm
                if self.scaler.enabled:
                    stats["skipped"] = float(skipped)
                self.scaler.step(self.optimizer)
                self.update_log.append(stats)
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        self.optimizer.zero_grad(set_to_none=True)
        return {k: v / counts[k] for k, v in totals.items()}

    def step(self) -> dict:
        """One iteration: rollouts, scoring, updates. Returns the logged row."""
        ro = self.rollout()
        stats = self.update(ro)
        self.iteration += 1
        kl = ((ro.logp - ro.ref_logp) * ro.mask).sum(1)
        row = {"step": self.iteration, "reward": ro.scores.mean().item(),
               "reward_std": ro.scores.std().item() if len(ro) > 1 else 0.0,
               "kl": kl.mean().item(), "response_len": (ro.lengths - ro.prompt_lens).float().mean().item(),
               "ended": ro.ended(self.eot_id).float().mean().item(), **self.judge_means(ro, "reward"), **stats}
        if self.args.algo == "rloo":
            row.update(rloo_stats(ro))
        self.last_rollout = ro
        return row

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward and KL on the fixed eval prompts, sampled with a fixed seed."""
        a = self.args
        gen = torch.Generator(device=self.device).manual_seed(a.seed + 12345)
        with self._autocast():
            ro = sample_responses(self.policy, self.eval_prompts, a.eval_samples, a.max_new_tokens,
                                  self.eot_id, a.temperature, a.top_k, gen, a.cuda_graphs)
            score_rollout(ro, self.model, self.ref, self.reward_model, a.temperature)
        kl = ((ro.logp - ro.ref_logp) * ro.mask).sum(1)
        # the reward model's own score, without --missing-eot-penalty: comparable across runs
        return {"eval_reward": ro.scores.mean().item(), "eval_kl": kl.mean().item(),
                "eval_ended": ro.ended(self.eot_id).float().mean().item(), **self.judge_means(ro, "eval_reward")}

    @property
    def judge_keys(self) -> list:
        return self.reward_model.keys if isinstance(self.reward_model, WeightedReward) else []

    def judge_means(self, ro: Rollout, prefix: str) -> dict:
        """{prefix_<key>: each judge's mean score (raw: no weight, no penalty)}; {} for one judge alone."""
        if ro.judge_scores is None:
            return {}
        return {f"{prefix}_{k}": ro.judge_scores[:, i].mean().item() for i, k in enumerate(self.judge_keys)}

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "optimizer": self.optimizer.state_dict(),
                "value_head": None if self.model.value_head is None else self.model.value_head.state_dict(),
                "rng": common.rng_state(), "generator": self.generator.get_state(),
                "shuffle_gen": self.shuffle_gen.get_state(), "score_norm": self.score_norm,
                "args": {**vars(self.args), **self.run_args}, **self.frozen_fingerprints, "precision": str(self.dtype),
                "kernels": self.policy.config.kernels, "name": f"rlhf-{self.args.algo}",
                "scaler": self.scaler.state_dict(), "prompt_format": self.prompt_format,
                "advantage_std": ADVANTAGE_STD}

    def save_checkpoint(self):
        """The policy as a GPT checkpoint (usable by generate/dpo/rlhf --init; with LoRA it holds W, A and
        B, and loads merged); the rest in state.pt."""
        path = self.checkpointer.save(self.iteration, self.policy, self.state_dict())
        self.plot()
        return path

    def resume(self, where):
        ckpt = common.resume_checkpoint(self.out_dir, where)
        state = common.load_state(ckpt)
        if state.get("name") != f"rlhf-{self.args.algo}":
            raise UserError(f"--resume: {ckpt} is not an rlhf --algo {self.args.algo} checkpoint")
        # A QLoRA run's base quantized otherwise (or not) is named by its flags, before the reference's fingerprint
        # (which differs too) would blame --init, and before the weights (which would not fit).
        common.check_same_base(self.policy, ckpt, QLORA_GROUP_FLAG, saved_args=state.get("args", {}))
        # The frozen models are rebuilt from --init and --reward: other ones would change the KL
        # and the rewards the run optimises, silently.
        # Several judges (either run's): their lists are compared first, then each one's weights.
        saved = state.get("args", {})
        several = "rewards" in saved or "rewards" in self.run_args
        for key, flag in (("ref_fingerprint", "--init"), ("reward_fingerprint", "--reward")):
            if several and key == "reward_fingerprint":
                continue
            if key in state and not common.same_fingerprint(state[key], self.frozen_fingerprints[key]):
                raise UserError(f"--resume: {flag} is not the model {ckpt}'s run started from (its "
                                f"weights differ): pass the same {flag} as that run")
        # A verifier has no weights to tell apart; stop 27's runs (no key) verified exact match.
        no_weights = tuple(state.get("reward_fingerprint", ())) == (0.0, 0.0)
        was, now = saved.get("verifier", "exact" if no_weights else None), self.run_args.get("verifier")

        def judge(v):
            return f"--reward {v}" if v else "a reward model"
        now_args = {**vars(self.args), **self.run_args}
        if "group_size" in saved:  # compared and named as they run: 0 is the algorithm's own count, not a count
            saved = {**saved, "group_size": responses_per_prompt(saved["group_size"], saved.get("algo", self.args.algo))}
            now_args["group_size"] = self.args.samples_per_prompt
        if several:
            was_all = list(saved["rewards"]) if "rewards" in saved else [was]
            now_all = list(self.run_args["rewards"]) if "rewards" in self.run_args else [now]
            if was_all != now_all:
                raise UserError(f"--resume: {ckpt}'s run was judged by {' and '.join(map(judge, was_all))}, not "
                                f"{' and '.join(map(judge, now_all))}: pass the same --reward flags as that run, "
                                "in the same order")
            self._check_judge_weights(state, ckpt)
            # the weights are a flag's numbers, noted as a changed flag is (one judge's run had 1)
            saved = {**saved, "reward_weights": list(saved.get("reward_weights", [1.0] * len(was_all)))}
            now_args["reward_weights"] = list(self.run_args.get("reward_weights", [1.0] * len(now_all)))
        elif "verifier" in self.run_args and was != now:
            raise UserError(f"--resume: {ckpt}'s run was judged by {judge(was)}, not {judge(now)}: pass the same "
                            f"--reward as that run")
        elif "verifier" in self.run_args:
            saved = {**saved, "verifier": was}  # stop 27's, inferred: not a flag newer than the checkpoint
        common.load_checkpoint_weights(self.policy, ckpt, self.device, self.policy.config, "policy")
        names = TRAJECTORY_ARGS + tuple(self.run_args) + (("reward_weights",) if several else ())
        # the aux loss's weight is the policy's config (--init's, or --moe-aux-loss), not an RLArgs field: compared
        # with the config saved beside the policy's weights, as the Trainer's resume compares it
        saved_cfg = common.saved_model_config(ckpt / "model.safetensors")
        if saved_cfg.get("n_experts"):
            now_args, names = {**now_args, "moe_aux_loss": self.policy.config.moe_aux_loss}, names + ("moe_aux_loss",)
            saved = {**saved, "moe_aux_loss": saved_cfg.get("moe_aux_loss", 0.0)}
        common.check_resume(ckpt, {**state, "args": saved}, now_args, tuple(dict.fromkeys(names)),
                            "iteration", "--iterations",
                            str(self.dtype), say=self.log_enabled, kernels=self.policy.config.kernels,
                            defaults={**{f.name: f.default for f in fields(RLArgs)}, **_rlhf_data_defaults()})
        self._note_population_std(state, ckpt)
        if self.model.value_head is not None:
            self.model.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state.get("scaler"))
        common.set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.shuffle_gen.set_state(state["shuffle_gen"])
        self.iteration = state["iteration"]
        self.score_norm = state.get("score_norm")
        if several and saved["reward_weights"] != now_args["reward_weights"]:
            # PPO's (shift, scale) was the first batch's of the old weighted sum: the new one is normalized anew
            # (or not at all, as for a fresh run, where no reward model counts in it)
            self.score_norm = None
        self.history = self.metrics.truncate(self.iteration)
        return ckpt

    def _note_population_std(self, state, ckpt):
        """A checkpoint that records no advantage_std predates the sample std (ADVANTAGE_STD): its run divided GRPO's
        centered scores by the population std, and whitened PPO's advantages with the population variance. Its
        resume goes on with the sample one, so the advantages change scale: noted once, as check_resume notes a
        changed flag (TRL's resume takes the trainer's settings as they are now); the checkpoints from here on
        record the std they use. GRPO's only where its run's --scale-rewards is this one's (none divides by no std; a
        changed one is check_resume's note; a run from before the flag: group)."""
        if "advantage_std" in state or not self.log_enabled:
            return
        a = self.args
        was = state.get("args", {}).get("scale_rewards", "group")
        if a.algo == "grpo" and a.scale_rewards != "none" and a.scale_rewards == was:
            n = a.samples_per_prompt if a.scale_rewards == "group" else a.prompts_per_iter * a.samples_per_prompt
            whose = "each group's" if a.scale_rewards == "group" else "the rollout's"
            what = (f"divided by {whose} population std, these are by the sample std (TRL's), sqrt((n - 1) / n) = "
                    f"{math.sqrt((n - 1) / n):.3f} times as large at n = {n} (--scale-rewards {a.scale_rewards})")
        elif a.algo == "ppo":
            what = ("whitened with the population variance of a rollout's n response tokens, these are with the "
                    "sample one (TRL's masked_whiten), sqrt((n - 1) / n) times as large")
        else:
            return
        note(f"resuming {ckpt}, whose run predates the sample std (its state.pt records no advantage_std): its "
             f"advantages were {what}: the run goes on differently from the one it was started as")

    def _check_judge_weights(self, state, ckpt):
        """Several judges, the same list: each reward model's weights are those of the run's (the
        reward_fingerprints of both), else the sum of all of theirs (reward_fingerprint)."""
        was, now = state.get("reward_fingerprints"), self.frozen_fingerprints.get("reward_fingerprints")
        if was is not None and now is not None and len(was) == len(now):
            labels = self.reward_model.labels if isinstance(self.reward_model, WeightedReward) else [None]
            for i, (a, b) in enumerate(zip(was, now)):
                if not common.same_fingerprint(a, b):
                    raise UserError(f"--resume: --reward {labels[i]} (--reward #{i + 1}) is not the model "
                                    f"{ckpt}'s run was judged by (its weights differ): pass the same --reward as "
                                    "that run")
        elif "reward_fingerprint" in state and not common.same_fingerprint(
                state["reward_fingerprint"], self.frozen_fingerprints["reward_fingerprint"]):
            raise UserError(f"--resume: --reward is not the model {ckpt}'s run started from (its weights differ): "
                            "pass the same --reward as that run")

    def plot(self):
        if not self.log_enabled:
            return
        self._plotted = common.replot(self._plotted, self.metrics.rows(), self.plot_path,
                                      keys=("reward", "eval_reward", *(f"eval_reward_{k}" for k in self.judge_keys),
                                            "kl", "value_loss", "entropy"),
                                      title=f"rlhf ({self.args.algo})")

    def _log_row(self, row):
        self.history.append(row)
        self.metrics.log(**row)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Run to args.iterations; the trackers' runs (--report-to) end with it, or on an error."""
        with self.metrics.finishing():
            return self._fit()

    def _fit(self) -> dict:
        from tqdm import tqdm

        a = self.args
        if self._clear_first and self.log_enabled:  # --overwrite
            common.clear_run(self.out_dir)
        if a.resume:
            ckpt = self.resume(a.resume)
            self._say(f"resumed from {ckpt} at iteration {self.iteration}")
        else:
            common.set_seed(a.seed)
        self.metrics.start_trackers()  # after resume's truncate, which they need to know
        first_eval = None
        if self.iteration == 0:
            first_eval = self.evaluate()
            self._log_row({"step": 0, **first_eval})
            self._say(f"iter      0 | eval_reward {first_eval['eval_reward']:.4f} | eval_kl {first_eval['eval_kl']:.4f}")
        bar = tqdm(total=a.iterations, initial=self.iteration, desc=f"rlhf-{a.algo}",
                   dynamic_ncols=True, mininterval=0.5, disable=not self.log_enabled)
        last_eval = first_eval
        try:
            while self.iteration < a.iterations:
                row = self.step()
                if (a.eval_every and self.iteration % a.eval_every == 0) or self.iteration == a.iterations:
                    last_eval = self.evaluate()
                    row.update(last_eval)
                self._log_row(row)
                bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.3f}", refresh=False)
                bar.update(1)
                self._say(" | ".join([f"iter {row['step']:>6}"] + [
                    f"{k} {row[k]:.4f}" for k in ("reward", "kl", "entropy", "clip_frac", "value_loss",
                                                   "eval_reward") if k in row]))
                if a.ckpt_every and self.iteration % a.ckpt_every == 0 and self.log_enabled:
                    self.save_checkpoint()
        finally:
            bar.close()
        if last_eval is None:  # resumed at the last iteration: nothing ran, evaluate what was loaded
            last_eval = self.evaluate()
        ckpt = None
        if self.log_enabled:
            latest = self.checkpointer.latest()
            ckpt = latest if latest is not None and latest.name == f"ckpt-{self.iteration:07d}" \
                else self.save_checkpoint()
            self.plot()
        rows = [r for r in self.history if "reward" in r]
        judges = {}
        if self.judge_keys:  # several judges: each one's eval mean, first and last
            judges = {"first_eval_judges": {k: first_eval[f"eval_reward_{k}"] for k in self.judge_keys}
                      if first_eval else None,
                      "eval_judges": {k: last_eval[f"eval_reward_{k}"] for k in self.judge_keys}}
        return {**judges, "algo": a.algo, "iterations": self.iteration,
                "first_eval_reward": first_eval["eval_reward"] if first_eval else None,
                "eval_reward": last_eval["eval_reward"] if last_eval else None,
                "eval_kl": last_eval["eval_kl"] if last_eval else None,
                "reward": rows[-1]["reward"] if rows else None, "kl": rows[-1]["kl"] if rows else None,
                "checkpoint": str(ckpt) if ckpt else None,
                "metrics_path": str(self.metrics.path), "plot_path": str(self.plot_path)}

    def _say(self, msg):
        if self.log_enabled:
            from tqdm import tqdm

            tqdm.write(msg)


# -- CLI ----------------------------------------------------------------------------------------
def prompt_ids(prompts, tokenizer, room: int) -> list:
    """Unique prompts (texts, or a chat's parts) as token lists that leave `room` tokens of context."""
    seen, out = set(), []
    for p in prompts:
        if p in seen:
            continue
        seen.add(p)
        ids = encode_prompt(tokenizer, p)
        if ids and len(ids) <= room:
            out.append(ids)
    return out


def verified_prompts(source, n: int, val_fraction: float, seed: int, verifier: str):
    """(train, held-out) lists of (prompt, reference answer, prompt format) for a verifier: the
    embedded tasks' pairs or a preference file's (the chosen answer: the task's right one), or SFT
    records of any format (the completion), split by prompt as `sft` splits them. `number` needs a
    number in every reference: one without would score every response 0."""
    from tritongpt.train import formats, sft
    from tritongpt.train.preference import is_embedded, train_val_pairs

    if is_embedded(source) or any(isinstance(rec, dict) and "chosen" in rec
                                  for _, rec in sft.read_json_records(source)[:1]):
        splits = [[(p.prompt, p.chosen, p.format) for p in ps]
                  for ps in train_val_pairs(source, n, val_fraction, seed)]
    else:
        splits = [[(formats.record_prompt(r), r["output"], formats.format_of(r)) for r in rs]
                  for rs in sft.split_records(sft.read_records(source), val_fraction)]
    if VERIFIERS[verifier] is tasks.number_match:
        for prompt, answer, _ in splits[0] + splits[1]:
            if tasks.last_number(answer) is None:
                raise UserError(f"--reward {verifier}: the reference answer {answer[:60]!r} (to the prompt "
                                f"{formats.prompt_key(prompt)[:60]!r}) has no number; `number` compares the "
                                f"last numbers (--reward exact compares whole answers)")
    return splits


def note_other_tokenizer(reward: str, tok, end: int | None = None) -> None:
    """A note when the tokenizer saved with the reward model (its run's, or a Hugging Face folder's) encodes other
    ids than the policy's: the vocab sizes can agree while the ids mean other text, and every score is then off.
    One of the same ids but another end token than the one the policy's responses end at (`end`: the eot, or a chat
    template's end of turn; None: tok's eot) gets its own note: the reward model learned to score answers at its
    end token (a chat model's, <|im_end|>, beside its base model's <|endoftext|>: no note in a ChatML run)."""
    from tritongpt.train.sft import load_quietly
    from tritongpt.train.tokenizer import same_ids, saved_tokenizer_path

    saved = saved_tokenizer_path(reward)
    other = None if saved is None else load_quietly(saved)
    if other is None:
        return
    if not same_ids(other, tok):
        note(f"the tokenizer saved with --reward {reward} ({saved}) is not the policy's: the reward model will score "
             "the policy's token ids as if they were its own (pass a reward model trained on the policy's tokenizer)")
    elif other.eot_id != (end := tok.eot_id if end is None else end):
        note(f"the tokenizer saved with --reward {reward} ({saved}) encodes as the policy's but ends a text with "
             f"token {other.eot_id} ({other.decode([other.eot_id])!r}), the policy's responses with {end} "
             f"({tok.decode([end])!r}): the reward model scores each response at the policy's end token, "
             "which it did not learn to score at")


# QLoRA's int4 group (add_qlora_args' --group-size elsewhere): rlhf's --group-size is GRPO's and RLOO's group
QLORA_GROUP_FLAG = "--quantize-group-size"


def rlhf_run_args(args, policy=None) -> dict:
    """data_run_args with the int4 group under its rlhf name (quantize_group_size): a group_size there would
    overwrite GRPO's in the run record. policy: as set up from --init (a GPTQ or AWQ folder's base recorded)."""
    from tritongpt.train.reward import data_run_args

    return data_run_args(args, QLORA_GROUP_FLAG, policy)


def _rlhf_data_defaults() -> dict:
    from tritongpt.train.reward import DATA_DEFAULTS

    return {**{k: v for k, v in DATA_DEFAULTS.items() if k != "group_size"}, "quantize_group_size": None}


def cmd_rlhf(args):
    from tritongpt.train.chat import note_template_mismatch
    from tritongpt.train.preference import note_batch_repeats, train_val_pairs
    from tritongpt.train.reward import RewardModel, build_backbone, check_num_pairs
    from tritongpt.train.chat_template import answer_end_id, chat_template_for
    from tritongpt.train.sft import pick_tokenizer
    from tritongpt.train.tokenizer import save_run_tokenizer

    from tritongpt.commands import apply_lora, check_lora_args, check_qlora, quantize_base

    a = RLArgs.from_namespace(args)
    a.validate()
    check_lora_args(args)
    check_qlora(args, QLORA_GROUP_FLAG)
    check_num_pairs(args)
    check_one_process()
    common.check_out_dir(a.out_dir, a.resume, a.overwrite)  # before the tokenizer is written there
    common.set_seed(a.seed)
    device = common.pick_device(a.device)
    rewards = [args.reward] if isinstance(args.reward, str) else list(args.reward or [])
    if not rewards:
        raise UserError("--reward is required: a reward model checkpoint from `tritongpt reward`, or a verifier: "
                        "`exact` or `number`")
    weights = check_reward_weights(len(rewards), getattr(args, "reward_weights", None))
    check_distinct_rewards(rewards)
    several = len(rewards) > 1 or weights != [1.0]  # else one judge, as before --reward was repeatable
    verifiers = [r for r in rewards if r in VERIFIERS]
    models = [r for r in rewards if r not in VERIFIERS]
    verify = bool(verifiers)
    if verify:  # (prompt, reference answer, format) triples; `number` checks that every answer has a number
        numeric = [r for r in verifiers if VERIFIERS[r] is tasks.number_match]
        train, val = verified_prompts(args.data, args.num_pairs, args.val_fraction, a.seed, (numeric or verifiers)[0])
    else:
        train, val = [[(p.prompt, p.chosen, p.format) for p in ps]
                      for ps in train_val_pairs(args.data, args.num_pairs, args.val_fraction, a.seed)]
    note_batch_repeats(a.prompts_per_iter, len(train), "--prompts-per-iter", "prompts", args.data)
    formats_used = [f for _, _, f in train + val]
    note_template_mismatch(formats_used, {"--init": args.init, "--reward": models[0] if models else None})
    for r in models[1:]:
        note_template_mismatch(formats_used, {"--reward": r})
    policy = build_backbone(args)
    common.set_moe_aux_loss(policy, args)  # before the reference copies it (whose forwards add no loss anyway)
    loaded = {r: RewardModel.load(r, map_location=device, quantized_ok=True) for r in models}  # QLoRA: unmerged
    # QLoRA: the reference is the quantized base (--quantize's, or a GPTQ/AWQ folder's own), the policy with its
    # updates at 0 (the KL starts at 0)
    quantize_base(policy, args, QLORA_GROUP_FLAG)
    ref = copy.deepcopy(policy)
    # the reference stays the whole --init model (quantized with --quantize); PPO's value head trains whole, in float
    apply_lora(policy, args, "new value head" if a.algo == "ppo" else None)
    for r, rm in loaded.items():
        if rm.config.vocab_size != policy.config.vocab_size:
            raise UserError(f"{f'--reward {r}: ' if several else ''}reward model vocab ({rm.config.vocab_size}) "
                            f"differs from the policy's ({policy.config.vocab_size}): they must share a tokenizer")
    check_distinct_reward_models(loaded)
    tok = pick_tokenizer(args.tokenizer, args.init, policy.config.vocab_size)
    tok = chat_template_for(tok, "rlhf", args.chat_template, any(fmt == "chat" for _, _, fmt in train + val))
    end = answer_end_id(tok, train[0][0])  # what ends a response: the eot, or a chat template's end of turn
    for r in models:
        note_other_tokenizer(r, tok, end)
    answers = {}
    for prompt, answer, _ in train + val if verify else ():  # a prompt a file gives several answers takes any
        answers.setdefault(tuple(encode_prompt(tok, prompt)), []).append(answer)
    judges = [TaskReward(tok, answers, policy.config, match=VERIFIERS[r], end_id=end) if r in VERIFIERS
              else loaded[r] for r in rewards]
    reward_model = WeightedReward(judges, weights, labels=rewards) if several else judges[0]
    save_run_tokenizer(tok, a.out_dir)
    room = min(policy.config.context_length, *(j.config.context_length for j in judges)) - a.max_new_tokens
    prompts = prompt_ids([p for p, _, _ in train], tok, room)
    eval_prompts = prompt_ids([p for p, _, _ in val or train], tok, room)[:a.eval_prompts]
    if several:  # the judges in --reward order (a reward model: None, told apart by its weights) and weights
        run_args = {**rlhf_run_args(args, policy), "rewards": [("exact" if r == "tasks" else r) if r in VERIFIERS
                                                               else None for r in rewards], "reward_weights": weights}
    else:
        run_args = {**rlhf_run_args(args, policy), "verifier": ("exact" if rewards[0] == "tasks" else rewards[0])
                    if verify else None}
    trainer = RLHFTrainer(policy, ref, reward_model, prompts, eval_prompts, end, a,
                          run_args=run_args, prompt_format=train[0][2])
    result = trainer.fit()
    before = result["first_eval_reward"]
    before = "(resumed)" if before is None else f"{before:.4f}"
    if several:  # the weighted sum, then each judge's own
        keys = reward_model.keys
        what = "eval reward " + " + ".join(f"{w:g} x {k}" for w, k in zip(weights, keys))
        firsts = result.get("first_eval_judges") or {}
        each = ", ".join(f"{k}{f' ({MATCHED[r]})' if r in VERIFIERS else ''} "
                         f"{f'{firsts[k]:.4f}' if k in firsts else '(resumed)'} -> {result['eval_judges'][k]:.4f}"
                         for k, r in zip(keys, rewards))
        after = f"{result['eval_reward']:.4f} (each judge's: {each})"
    else:
        what = f"eval {MATCHED[rewards[0]]} (the verifier's reward)" if verify else "eval reward"
        after = f"{result['eval_reward']:.4f}"
    print(f"rlhf ({a.algo}): {what} {before} -> {after}, "
          f"KL to reference {result['eval_kl']:.4f} nats/response (a sampled estimate: "
          f"near 0 it can come out negative); checkpoint {result['checkpoint']}")
    return 0


def check_distinct_rewards(rewards: list) -> None:
    """A judge given twice is refused (a weight says how much it counts): a verifier by its name
    (`tasks` is `exact`), a reward model by its path, resolved."""
    seen = {}
    for r in rewards:
        key = ("exact" if r == "tasks" else r) if r in VERIFIERS else str(Path(r).resolve()) if Path(r).exists() else r
        if key in seen:
            same = f" (as --reward {seen[key]})" if seen[key] != r else ""
            raise UserError(f"--reward {r} is given twice{same}: give each judge once, and --reward-weights to "
                            "weigh it more")
        seen[key] = r


def check_distinct_reward_models(loaded: dict) -> None:
    """Two --reward paths of the same weights (a run folder and its checkpoint) are one judge twice."""
    prints = {}
    for r, rm in loaded.items():
        fp = common.weights_fingerprint(rm)
        for other, ofp in prints.items():
            if common.same_fingerprint(fp, ofp):
                raise UserError(f"--reward {r} and --reward {other} are the same reward model (the same weights): "
                                "give each judge once, and --reward-weights to weigh it more")
        prints[r] = fp


_HELP = {
    "out_dir": "folder for metrics.jsonl, rlhf.png and checkpoints",
    "iterations": "rollout + update rounds",
    "prompts_per_iter": "prompts sampled per rollout batch",
    "group_size": "responses per prompt (GRPO's G, RLOO's k; >= 2 for both); 0 = 1 for PPO, 4 for GRPO, 2 for RLOO",
    "max_new_tokens": "longest response; responses end at end-of-text",
    "cuda_graphs": "generate the rollouts with each decode step a CUDA-graph replay (generate --cuda-graphs: the same "
                   "tokens without the host's per-launch cost; CUDA only, one capture per generate call)",
    "missing_eot_penalty": "taken off the training score of a response that max-new-tokens cut before its "
                           "end-of-text (0 = off; the logged reward includes it, eval_reward does not)",
    "temperature": "sampling temperature of the rollouts (> 0); the log-probs, KL and entropy are those of the "
                   "policy and reference at this temperature",
    "epochs": "passes over each rollout batch",
    "minibatch_size": "responses per gradient step",
    "lr": "AdamW learning rate (constant)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "clip the global gradient norm (0 = off)",
    "kl_coef": "KL weight: PPO per-token penalty in the reward, GRPO k3 term in the loss, RLOO the response's "
               "summed log pi - log pi_ref taken off its reward",
    "clip_eps": "PPO/GRPO/RLOO ratio clip (RLOO's: one per response): the ratio is clipped to [1 - clip-eps, "
                "1 + clip-eps] (the upper bound: --clip-eps-high)",
    "clip_eps_high": "PPO/GRPO/RLOO: the ratio's upper clip bound 1 + E instead of 1 + clip-eps, the lower one staying "
                     "1 - clip-eps (DAPO's clip-higher, TRL's epsilon_high; DAPO uses 0.28 with clip-eps 0.2; "
                     "None: clip-eps, a symmetric clip)",
    "delta": "PPO/GRPO: cap the unclipped ratio term of the surrogate at D, so that a token with a negative "
             "advantage whose ratio ran far above 1 has a bounded loss and gradient (INTELLECT-2's two-sided "
             "clipping, TRL's delta; must be > 1 + clip-eps-high, e.g. 4 with the default clips; None: no cap)",
    "value_clip": "PPO value clip around the rollout-time values",
    "vf_coef": "PPO value-loss weight",
    "ent_coef": "entropy bonus weight",
    "gamma": "PPO discount",
    "lam": "PPO GAE lambda",
    "loss_type": "GRPO: how a minibatch's token losses become one: grpo (each response's mean, then the mean), "
                 "bnpo (the mean over all its tokens), dr_grpo (their sum / (responses x max-new-tokens), "
                 "Dr. GRPO's), dapo (their sum / the response tokens of the whole rollout per minibatch: every "
                 "rollout token weighs the same, DAPO's token-level loss as TRL computes it)",
    "scale_rewards": "GRPO: divide each centered score by its group's std (group), the rollout's (batch), or not "
                     "at all (none, Dr. GRPO's)",
    "mask_truncated": "GRPO/RLOO: leave the responses that max-new-tokens cut before their end-of-text out of the "
                      "loss, as if not in their minibatch (TRL's mask_truncated_completions, DAPO's overlong "
                      "filtering; RLOO: a loss of 0 in the mean); their scores still count in their group's mean and "
                      "std (RLOO: its baseline)",
    "importance_sampling_level": "GRPO: the ratio the surrogate clips: one per token (token) or one per response, "
                                 "exp of the mean over its tokens of log pi - log pi_old, on all of them (sequence, "
                                 "GSPO's; its paper clips far tighter, --clip-eps 3e-4 --clip-eps-high 4e-4)",
    "normalize_advantages": "RLOO: standardize the rollout's leave-one-out advantages, (A - mean) / (std + 1e-4) "
                            "(TRL's normalize_advantages)",
    "eval_every": "score the fixed eval prompts every N iterations (0 = first and last only)",
    "eval_prompts": "held-out prompts in the fixed eval set",
    "eval_samples": "sampled responses per eval prompt",
    "ckpt_every": "checkpoint every N iterations (0 = at the end only)",
    "keep_ckpts": "keep the newest K checkpoints",
    "dtype": common.DTYPE_HELP,
    "seed": "random seed",
}


def add_cli(sub):
    from tritongpt.commands import add_lora_args, add_model_args, add_qlora_args, add_vocab_multiple_arg
    from tritongpt.train.reward import add_data_args

    p = sub.add_parser("rlhf", help=command_help("rlhf"),
                       description="PPO (value head, GAE, per-token KL penalty in the reward), GRPO "
                                   "(group-relative advantages, k3 KL in the loss) or RLOO (leave-one-out "
                                   "baseline, sequence KL in the reward) on an SFT policy, scored by a reward model "
                                   "from `tritongpt reward` or a verifier.")
    add_model_args(p, default_model=None, default_text="tiny, with no --init")
    add_data_args(p)  # prompts come from the preference data (embedded tasks by default)
    add_vocab_multiple_arg(p, None, "as the --init model has them")
    add_lora_args(p)
    add_qlora_args(p, QLORA_GROUP_FLAG)  # --group-size is GRPO's and RLOO's responses per prompt
    common.add_moe_aux_arg(p)
    p.add_argument("--reward", action="append", metavar="REWARD",
                   help="a judge, repeatable (several: TRL's reward_funcs; a response's score is the weighted sum "
                        "of their scores, see --reward-weights): a reward model, a checkpoint of `tritongpt reward` "
                        "(file, checkpoint or run folder), or a Hugging Face <Family>ForSequenceClassification with "
                        "one label (a folder or Hub repo id, as TRL's RewardTrainer saves; it must share the "
                        "policy's tokenizer); or a verifier, 1 for a response that matches its prompt's reference "
                        "answer and 0 otherwise (RL with verifiable rewards): `exact` (the whole answer, stripped; "
                        "`tasks` is the same) or `number` (its last number, as GSM8K's `#### 72`). The references: "
                        "the embedded tasks' answers, or --data's (SFT records' completions, preference pairs' "
                        "chosen answers); with a verifier among several judges, every reward model scores the "
                        "responses to the verifier's prompts. A folder of one of those names: ./exact")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per --reward, in their order (TRL's reward_weights): the score is "
                        "sum w_i * score_i; negative steers away from a judge, 0 logs it without optimising it, "
                        "all 0 is refused (default: 1 each)")
    d = RLArgs()
    choices = {"dtype": common.DTYPES, "loss_type": GRPO_LOSS_TYPES, "scale_rewards": SCALE_REWARDS,
               "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS}
    types = {"clip_eps_high": float, "delta": float}  # a default of None: the type is the flag's
    g = p.add_argument_group("rl")
    g.add_argument("--algo", choices=ALGOS, default=d.algo,
                   help="ppo, grpo or rloo (REINFORCE leave-one-out, TRL's RLOOTrainer) (default %(default)s)")
    for f in fields(RLArgs):
        if f.name in ("algo", "device", "kernels", "top_k", "resume", "overwrite", "activation_checkpointing",
                      "reward_clip_range", *common.TRACKING_FIELDS):  # common.add_tracking_args' flags, below
            continue
        if isinstance(f.default, bool):  # a switch, off by default
            g.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=_HELP.get(f.name, f.name))
            continue
        kw = {"choices": choices[f.name]} if f.name in choices else {}
        g.add_argument("--" + f.name.replace("_", "-"), type=types.get(f.name, type(f.default)), default=f.default,
                       help=f"{_HELP.get(f.name, f.name)} (default %(default)s)", **kw)
    g.add_argument("--top-k", type=int, default=None,
                   help="sample the rollouts from the top k tokens only (the log-probs, ratios and KL stay "
                        "those of the whole vocabulary at --temperature, an approximation)")
    g.add_argument("--reward-clip-range", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="RLOO: clamp each score to [LO, HI] before the KL and --missing-eot-penalty are taken off "
                        "(TRL's reward_clip_range; default: no clamp)")
    g.add_argument("--overwrite", action="store_true", help=common.OVERWRITE_HELP)
    g.add_argument("--activation-checkpointing", action="store_true", help=common.ACTIVATION_CHECKPOINTING_HELP)
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from the newest checkpoint in --out-dir, or a checkpoint folder "
                        "(pass the same --init: it is the frozen reference; and QLoRA's --quantize and "
                        "--quantize-group-size, with which the base is quantized again)")
    common.add_tracking_args(p)
    p.set_defaults(func=cmd_rlhf)
