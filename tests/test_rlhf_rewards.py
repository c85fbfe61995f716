"""Several judges in one rlhf run: --reward A --reward B ... --reward-weights w1 w2 ... (TRL's reward_funcs
and reward_weights). A response's score is sum_i w_i * score_i; each judge's own mean is logged beside it."""
import copy
import json
import shutil

import pytest
import torch
import torch.nn as nn

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig, get_config
from tritongpt.model.gpt import GPTModel
from tritongpt.train import tasks
from tritongpt.train.common import MetricsLog
from tritongpt.train.reward import RewardModel
from tritongpt.train.rlhf import (RLArgs, RLHFTrainer, TaskReward, WeightedReward, check_reward_weights,
                                  compute_advantages, group_advantages)

import test_rlhf
from test_rlhf import CTX, tiny_config

data, easy_reward = test_rlhf.data, test_rlhf.easy_reward  # test_rlhf's module fixtures, reused
try:
    import test_reward_import

    smollm = test_reward_import.smollm  # a Hugging Face policy folder and classifier (needs transformers)
except pytest.skip.Exception:  # no transformers: the one test that needs it is skipped
    @pytest.fixture
    def smollm():
        pytest.skip("needs transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


class Known(nn.Module):
    """A stand-in reward model whose score is a known function of the sequence: f(idx, lengths)."""

    def __init__(self, config, f):
        super().__init__()
        self.config, self.f = config, f
        self.w = nn.Parameter(torch.ones(1))  # a weight to fingerprint

    def set_kernels(self, kernels):
        pass

    def forward(self, idx, lengths):
        return self.f(idx, lengths) * self.w.detach()


class Digits:  # a tokenizer enough for a verifier: ids read as digits
    eot_id = 22

    def decode(self, ids):
        return "".join(str(i % 10) for i in ids)


def even(response, answer):
    """A verifier of one's own: right when the response has an even number of digits."""
    return len(response) % 2 == 0


def _tiny(tmp_path, judge_of, weights, log=False, run_args=None, **kw):
    """RLHFTrainer on random tiny models (vocab 23, prompts of 3 and 5 tokens) judged by
    WeightedReward(judge_of(cfg, prompts), weights)."""
    cfg = GPTConfig(vocab_size=23, context_length=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(13)
    policy = GPTModel(cfg)
    prompts = [torch.randint(0, 22, (3 + 2 * (i % 2),)).tolist() for i in range(6)]
    base = dict(algo="grpo", out_dir=str(tmp_path), iterations=1, prompts_per_iter=4, max_new_tokens=4, epochs=1,
                minibatch_size=4, lr=1e-2, eval_prompts=2, eval_samples=2, device="cpu", kernels="reference",
                seed=0, dtype="fp32", ckpt_every=0)
    base.update(kw)
    judge = WeightedReward(judge_of(cfg, prompts), weights)
    return RLHFTrainer(policy, copy.deepcopy(policy), judge, prompts, prompts[:2], 22, RLArgs(**base), log=log,
                       run_args=run_args)


def _length_and_first(cfg, prompts):
    return [Known(cfg, lambda idx, lengths: lengths.float()), Known(cfg, lambda idx, lengths: idx[:, 0].float()),
            TaskReward(Digits(), {tuple(p): "0" for p in prompts}, cfg, match=even)]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_the_score_fed_to_the_advantages_is_the_weighted_sum_of_the_judges(tmp_path, algo):
    """Stand-in judges of known scores (the sequence length, its first token, an even-length verifier):
    the rollout's scores are 2 * len - 0.5 * first + 3 * even, every judge's own kept beside; the
    advantages are those of that sum (GRPO's group standardization; PPO's, normalized by the sum's first
    batch); the logged row's reward is the mean of the sum, each judge's mean logged by its key."""
    weights = [2.0, -0.5, 3.0]
    t = _tiny(tmp_path, _length_and_first, weights, algo=algo, prompts_per_iter=8, seed=1)  # (both kinds of length)
    ro = t.rollout()
    even_by_hand = torch.tensor([float((n - p - int(row[n - 1] == 22)) % 2 == 0) for row, n, p in
                                 zip(ro.idx.tolist(), ro.lengths.tolist(), ro.prompt_lens.tolist())])
    want = 2.0 * ro.lengths.float() - 0.5 * ro.idx[:, 0].float() + 3.0 * even_by_hand
    assert 0 < even_by_hand.sum() < len(ro)
    assert torch.allclose(ro.scores, want)
    assert torch.equal(ro.judge_scores[:, 2], even_by_hand)
    assert torch.equal(ro.judge_scores[:, 0], ro.lengths.float())
    if algo == "grpo":
        adv = group_advantages(want, ro.group)
        assert torch.allclose(ro.advantages, adv.unsqueeze(1) * ro.mask.float())
    else:
        assert t.score_norm == pytest.approx((want.mean().item(), want.std().item()))
        again = compute_advantages(copy.copy(ro), t.args, (want.mean().item(), want.std().item()))
        assert torch.allclose(ro.advantages, again.advantages)
    row = t.step()
    assert t.judge_keys == ["rm1", "rm2", "verifier3"]
    means = [row[f"reward_{k}"] for k in t.judge_keys]
    assert row["reward"] == pytest.approx(sum(w * m for w, m in zip(weights, means)), abs=1e-6)
    ev = t.evaluate()
    assert ev["eval_reward"] == pytest.approx(sum(w * ev[f"eval_reward_{k}"] for w, k in zip(weights, t.judge_keys)),
                                              abs=1e-6)


def test_ppo_normalizes_the_sum_only_when_a_reward_model_counts_in_it(tmp_path):
    """Verifiers alone (or with reward models of weight 0): the sum is left as it is, (0, 1), as for one
    verifier; a reward model of a nonzero weight: the first batch's mean and std of the sum."""
    def verifier_and_rm(cfg, prompts):
        return _length_and_first(cfg, prompts)[::2]  # the length "reward model" and the verifier

    t = _tiny(tmp_path / "a", verifier_and_rm, [0.0, 2.0], algo="ppo")
    t.rollout()
    assert t.score_norm == (0.0, 1.0)
    t = _tiny(tmp_path / "b", verifier_and_rm, [0.5, 2.0], algo="ppo")
    ro = t.rollout()
    assert t.score_norm == pytest.approx((ro.scores.mean().item(), ro.scores.std().item()))
    assert t.score_norm[1] != 1.0


def test_missing_eot_penalty_comes_off_the_weighted_sum_once(tmp_path):
    runs = {}
    for penalty in (0.0, 2.0):
        runs[penalty] = _tiny(tmp_path / str(penalty), _length_and_first, [1.0, 1.0, 1.0], missing_eot_penalty=penalty,
                              max_new_tokens=3, seed=1).rollout()  # (seed 1: cut and ended responses)
    ro0, ro2 = runs[0.0], runs[2.0]
    cut = (~ro0.ended(22)).float()
    assert 0 < cut.sum() < len(ro0)
    assert torch.allclose(ro2.scores, ro0.scores - 2.0 * cut)
    assert torch.equal(ro2.judge_scores, ro0.judge_scores)  # each judge's own: no penalty


def test_reward_weights_are_checked():
    assert check_reward_weights(2, None) == [1.0, 1.0]
    assert check_reward_weights(2, [0, -1.5]) == [0.0, -1.5]  # one 0, one negative: allowed
    for weights, msg in (([1.0], "--reward-weights has 1 weight for 2 --reward judges"),
                         ([1.0, 2.0, 3.0], "--reward-weights has 3 weights for 2 --reward judges"),
                         ([1.0, float("nan")], "--reward-weights must be finite numbers, got nan"),
                         ([float("inf"), 1.0], "--reward-weights must be finite numbers, got inf"),
                         ([0.0, -0.0], r"--reward-weights are all 0 \(0 -0\)")):
        with pytest.raises(UserError, match=msg):
            check_reward_weights(2, weights)
    with pytest.raises(UserError, match="--reward-weights are all 0"):
        WeightedReward([nn.Identity()], [0.0])


# -- a verifier and a reward model, on the task data and a trained reward model ----------------------------------
def _verified_run(data, easy_reward, tmp_path, weights, **kw):
    tok, train, val = data
    rm = copy.deepcopy(easy_reward[0])
    torch.manual_seed(3)
    policy = GPTModel(tiny_config(tok.vocab_size))
    room = CTX - 6
    prompts = [tok.encode(p.prompt) for p in train if len(tok.encode(p.prompt)) <= room][:64]
    evals = [tok.encode(p.prompt) for p in val if len(tok.encode(p.prompt)) <= room][:4]
    answers = {tuple(tok.encode(p.prompt)): p.chosen for p in train + val}
    verifier = TaskReward(tok, answers, policy.config, match=even)
    args = dict(algo="grpo", out_dir=str(tmp_path), iterations=2, prompts_per_iter=4, group_size=2, max_new_tokens=6,
                epochs=1, minibatch_size=8, lr=3e-3, eval_every=1, eval_prompts=4, eval_samples=2, ckpt_every=0,
                device="cpu", kernels="reference", seed=0)
    args.update(kw)
    judge = WeightedReward([verifier, rm], weights)
    trainer = RLHFTrainer(policy, copy.deepcopy(policy), judge, prompts, evals, tok.eot_id, RLArgs(**args))
    return trainer, trainer.fit()


@pytest.mark.parametrize("weights", [[0.5, 2.0], [0.0, 1.0], [1.0, 0.0]])
def test_a_verifier_and_a_reward_model_log_each_judges_mean_and_their_weighted_sum(data, easy_reward, tmp_path,
                                                                                   weights):
    """Every row (iterations and evals, in metrics.jsonl) has reward_<key> for each judge, and reward =
    sum w_i * reward_<key_i>; a weight of 0 leaves its judge logged and out of the sum."""
    trainer, result = _verified_run(data, easy_reward, tmp_path, weights)
    rows = MetricsLog(tmp_path / "metrics.jsonl").rows()
    train_rows = [r for r in rows if "reward" in r]
    eval_rows = [r for r in rows if "eval_reward" in r]
    assert len(train_rows) == 2 and len(eval_rows) == 3
    for prefix, rs in (("reward", train_rows), ("eval_reward", eval_rows)):
        for r in rs:
            each = [r[f"{prefix}_verifier1"], r[f"{prefix}_rm2"]]
            assert r[prefix] == pytest.approx(sum(w * m for w, m in zip(weights, each)), abs=1e-6)
            assert 0.0 <= each[0] <= 1.0
    assert any(0 < r["reward_verifier1"] < 1 for r in train_rows)  # a verifier that is not always the same
    assert len({r["eval_reward_rm2"] for r in eval_rows}) > 1  # the reward model's score moved
    assert result["eval_judges"] == {"verifier1": eval_rows[-1]["eval_reward_verifier1"],
                                     "rm2": eval_rows[-1]["eval_reward_rm2"]}
    state = torch.load(tmp_path / "ckpt-0000002" / "state.pt", weights_only=False)
    assert state["args"]["rewards"] == [f"{__name__}.even", None]  # the judges, in order (None: a reward model)
    assert state["args"]["reward_weights"] == weights and len(state["reward_fingerprints"]) == 2


# -- two verifiers on the embedded tasks ---------------------------------------------------------------------------
def test_exact_and_number_together_on_the_embedded_tasks(data):
    """count_words' answers are numbers: a response that is the answer scores 1 + 1, one that ends with
    it (a sentence) 0 + 1, a wrong one 0 + 0; the sum weighs them."""
    from tritongpt.train.preference import task_preferences

    tok, _, _ = data
    pairs = [p for p in task_preferences(20, seed=0, template=lambda r: r["instruction"] + " " + r["input"] + " =",
                                         split="train", families="count_words")]
    answers = {tuple(tok.encode(p.prompt)): p.chosen for p in pairs}
    cfg = tiny_config(tok.vocab_size)
    judge = WeightedReward([TaskReward(tok, answers, cfg, match=tasks.exact_match),
                            TaskReward(tok, answers, cfg, match=tasks.number_match)], [1.0, 0.25])
    assert judge.keys == ["exact", "number"]
    p = pairs[0]
    rows, want = [], []
    for response, scores in ((" " + p.chosen, [1.0, 1.0]), ("words " + p.chosen, [0.0, 1.0]),
                             (p.rejected, [0.0, 0.0])):
        rows.append(tok.encode(p.prompt) + tok.encode(response) + [tok.eot_id])
        want.append(scores)
    width = max(map(len, rows))
    idx = torch.tensor([r + [tok.eot_id] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    prompt_lens = torch.full((3,), len(tok.encode(p.prompt)))
    scores = judge.scores(idx, lengths, prompt_lens)
    assert scores.tolist() == want
    assert judge(idx, lengths, prompt_lens).tolist() == [1.25, 0.25, 0.0]


# -- the CLI: --reward A --reward B --reward-weights ... ---------------------------------------------------------
def _cli_setup(tmp_path, num_pairs=True):
    """rlhf's flags for a tiny run; num_pairs False: without --num-pairs (a --data file's run, which refuses it)."""
    torch.manual_seed(0)
    init = tmp_path / "init.safetensors"
    GPTModel(get_config("tiny", vocab_size=4100, n_layer=1)).save(init)
    RewardModel(GPTModel(get_config("tiny", vocab_size=4100, n_layer=1, context_length=100))).save(tmp_path / "rm.st")
    return ["rlhf", "--init", str(init), *(["--num-pairs", "16"] if num_pairs else []), "--algo", "grpo",
            "--prompts-per-iter", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--epochs", "1", "--minibatch-size", "4",
            "--eval-prompts", "2", "--eval-samples", "1", "--device", "cpu", "--seed", "0"]


def test_rlhf_cli_with_a_verifier_and_a_reward_model(tmp_path, capsys, monkeypatch):
    """`--reward exact --reward RM --reward-weights 0.5 2`: the verifier's prompts, every one the judges'
    shorter context leaves room in; the rows and the final line name the sum and each judge; a resume
    with other weights is noted as a changed flag is, one with other judges refused as another verifier is;
    one --reward resumes a one-judge run as before (no per-judge keys, the same record)."""
    from tritongpt.cli import main

    argv = _cli_setup(tmp_path)
    rm = str(tmp_path / "rm.st")
    two = ["--reward", "exact", "--reward", rm, "--reward-weights", "0.5", "2", "--out-dir", str(tmp_path / "run")]
    assert main([*argv, *two, "--iterations", "1"]) == 0
    out = capsys.readouterr().out
    assert "rlhf (grpo): eval reward 0.5 x exact + 2 x rm2 " in out
    assert "(each judge's: exact (exact match) " in out and ", rm2 " in out
    rows = MetricsLog(tmp_path / "run" / "metrics.jsonl").rows()
    for r in rows:
        for prefix in ("reward", "eval_reward"):
            if prefix in r:
                assert r[prefix] == pytest.approx(0.5 * r[f"{prefix}_exact"] + 2 * r[f"{prefix}_rm2"], abs=1e-6)
    state = torch.load(tmp_path / "run" / "ckpt-0000001" / "state.pt", weights_only=False)
    assert state["args"]["rewards"] == ["exact", None] and state["args"]["reward_weights"] == [0.5, 2.0]
    assert "verifier" not in state["args"]
    assert main([*argv, *two[:4], "--reward-weights", "1", "2", *two[-2:], "--iterations", "2", "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "resuming with --reward-weights [1.0, 2.0] (the run had [0.5, 2.0])" in err
    assert "eval reward 1 x exact + 2 x rm2 (resumed) -> " in out and "exact (exact match) (resumed) -> " in out
    torch.manual_seed(1)
    RewardModel(GPTModel(get_config("tiny", vocab_size=4100, n_layer=1))).save(tmp_path / "rm_b.st")
    for judges, was in ((["--reward", rm, "--reward", "exact"], "a reward model and --reward exact"),
                        (["--reward", "exact", "--reward", rm, "--reward", str(tmp_path / "rm_b.st")],
                         "--reward exact and a reward model and a reward model"),
                        (["--reward", "exact"], "--reward exact")):
        assert main([*argv, *judges, *two[-2:], "--iterations", "3", "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"was judged by --reward exact and a reward model, not {was}: pass the same --reward flags" in err, err
    # another reward model in the same place: named
    assert main([*argv, *two[:3], str(tmp_path / "rm_b.st"), *two[4:], "--iterations", "3", "--resume"]) == 2
    assert f"--reward {tmp_path / 'rm_b.st'} (--reward #2) is not the model" in capsys.readouterr().err
    # one judge: no per-judge keys; a one-judge run resumed with one weight of 2 is noted as a weight change
    one = ["--reward", "exact", "--out-dir", str(tmp_path / "one")]
    assert main([*argv, *one, "--iterations", "1"]) == 0
    assert "rlhf (grpo): eval exact match (the verifier's reward)" in capsys.readouterr().out
    keys = {k for r in MetricsLog(tmp_path / "one" / "metrics.jsonl").rows() for k in r}
    assert "reward_std" in keys and not keys & {"reward_exact", "eval_reward_exact"}
    state = torch.load(tmp_path / "one" / "ckpt-0000001" / "state.pt", weights_only=False)
    assert state["args"]["verifier"] == "exact" and "rewards" not in state["args"]
    assert main([*argv, *one, "--reward-weights", "2", "--iterations", "2", "--resume"]) == 0
    assert "resuming with --reward-weights [2.0] (the run had [1.0])" in capsys.readouterr().err
    assert main([*argv, *one, "--reward", rm, "--iterations", "3", "--resume"]) == 2
    assert "was judged by --reward exact, not --reward exact and a reward model" in capsys.readouterr().err


def test_rlhf_cli_room_and_prompts_with_a_verifier_among_the_judges(tmp_path, capsys, monkeypatch):
    """The prompts and references are the verifier's; every prompt leaves max-new-tokens of room in the
    shortest context of the policy (128) and the judges (the reward model's 100)."""
    import tritongpt.train.rlhf as rlhf
    from tritongpt.cli import main

    seen = {}

    class Stub:
        def __init__(self, policy, ref, reward_model, prompts, eval_prompts, eot_id, args, **kw):
            seen.update(judge=reward_model, prompts=prompts + eval_prompts, run_args=kw["run_args"])

        def fit(self):
            return {"first_eval_reward": 0.0, "eval_reward": 0.0, "eval_kl": 0.0, "checkpoint": None,
                    "first_eval_judges": {"exact": 0.0, "rm2": 0.0}, "eval_judges": {"exact": 0.0, "rm2": 0.0}}

    monkeypatch.setattr(rlhf, "RLHFTrainer", Stub)
    argv = _cli_setup(tmp_path)
    argv[argv.index("--num-pairs") + 1] = "40"
    assert main([*argv, "--max-new-tokens", "24", "--reward", "exact", "--reward", str(tmp_path / "rm.st"),
                 "--out-dir", str(tmp_path / "a")]) == 0
    judge = seen["judge"]
    assert isinstance(judge, WeightedReward) and judge.weights == [1.0, 1.0] and judge.keys == ["exact", "rm2"]
    verifier, rm = judge.judges
    assert isinstance(verifier, TaskReward) and isinstance(rm, RewardModel)
    assert seen["prompts"] and all(tuple(p) in verifier.answers and len(p) <= 100 - 24 for p in seen["prompts"])
    assert any(len(p) > 100 - 24 for p in verifier.answers)  # the reward model's context cut some
    assert seen["run_args"]["rewards"] == ["exact", None] and seen["run_args"]["reward_weights"] == [1.0, 1.0]


def test_rlhf_cli_refuses_bad_weights_and_a_judge_given_twice(tmp_path, capsys):
    from tritongpt.cli import main

    argv = [*_cli_setup(tmp_path), "--iterations", "1", "--out-dir", str(tmp_path / "run")]
    rm = str(tmp_path / "rm.st")
    shutil_copy = tmp_path / "rm_copy.st"
    shutil_copy.write_bytes((tmp_path / "rm.st").read_bytes())
    (tmp_path / "other").mkdir()
    RewardModel(GPTModel(get_config("tiny", vocab_size=4000, n_layer=1))).save(tmp_path / "other" / "rm.st")
    for flags, msg in (
            (["--reward", "exact", "--reward", rm, "--reward-weights", "1"],
             "--reward-weights has 1 weight for 2 --reward judges: give one weight per --reward"),
            (["--reward", "exact", "--reward-weights", "1", "2"],
             "--reward-weights has 2 weights for 1 --reward judge"),
            (["--reward", "exact", "--reward", rm, "--reward-weights", "1", "nan"],
             "--reward-weights must be finite numbers, got nan"),
            (["--reward", "exact", "--reward", rm, "--reward-weights", "inf", "-0.5"],
             "--reward-weights must be finite numbers, got inf"),
            (["--reward", "exact", "--reward", rm, "--reward-weights", "0", "0"], "--reward-weights are all 0 (0 0)"),
            (["--reward", "exact", "--reward", "exact"], "--reward exact is given twice: give each judge once"),
            (["--reward", "tasks", "--reward", "exact"], "--reward exact is given twice (as --reward tasks)"),
            (["--reward", rm, "--reward", f"{tmp_path}/./rm.st"],
             f"--reward {tmp_path}/./rm.st is given twice (as --reward {rm})"),
            (["--reward", rm, "--reward", str(shutil_copy)], f"--reward {shutil_copy} and --reward {rm} are the "
                                                             "same reward model (the same weights)"),
            (["--reward", "exact", "--reward", str(tmp_path / "other" / "rm.st")],
             f"--reward {tmp_path / 'other' / 'rm.st'}: reward model vocab (4000) differs from the policy's (4100)"),
            (["--reward", rm, "--reward", str(tmp_path / "other" / "rm.st")],  # the second reward model's too
             f"--reward {tmp_path / 'other' / 'rm.st'}: reward model vocab (4000) differs from the policy's (4100)"),
            (["--reward", "exact", "--reward", "number"], "--reward number: the reference answer")):
        assert main([*argv, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert msg in err, (flags, err)
        assert not (tmp_path / "run").exists()  # refused before anything is written


def test_rlhf_cli_exact_and_number_on_a_files_answers(tmp_path, capsys):
    """Two verifiers on an SFT file of sums: the keys exact and number, reward = 1 x exact + 3 x number."""
    from tritongpt.cli import main

    nums = tmp_path / "sums.jsonl"
    nums.write_text("".join(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}) + "\n"
                            for a in range(6) for b in range(5)))
    argv = [*_cli_setup(tmp_path, num_pairs=False), "--data", str(nums), "--reward", "exact", "--reward", "number",
            "--reward-weights", "1", "3", "--iterations", "1", "--out-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    assert "eval reward 1 x exact + 3 x number " in capsys.readouterr().out
    rows = [r for r in MetricsLog(tmp_path / "run" / "metrics.jsonl").rows() if "reward" in r]
    assert rows and all(r["reward"] == pytest.approx(r["reward_exact"] + 3 * r["reward_number"], abs=1e-6)
                        for r in rows)


def test_rlhf_cli_fetches_a_hub_classifier_among_several_judges(smollm, tmp_path, monkeypatch, capsys):
    """`--reward exact --reward owner/name`: the Hub repo is fetched as a lone --reward's is (cli.fetch_hub_repos
    fetches each of the repeatable flag's values) and scores the verifier's prompts beside it."""
    from test_hf_tokenizer import fake_hub
    from tritongpt import cli

    policy, rm = smollm
    shutil.copytree(rm, tmp_path / "hub" / "someone" / "rm")
    fake_hub(monkeypatch, tmp_path / "hub", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)  # someone/rm is no path from here
    assert cli.main(["rlhf", "--init", str(policy), "--reward", "exact", "--reward", "someone/rm",
                     "--reward-weights", "1", "0.5", "--iterations", "1", "--num-pairs", "8", "--prompts-per-iter",
                     "2", "--minibatch-size", "2", "--epochs", "1", "--max-new-tokens", "4", "--eval-prompts", "2",
                     "--eval-samples", "1", "--device", "cpu", "--kernels", "reference",
                     "--out-dir", str(tmp_path / "rl")]) == 0
    out = capsys.readouterr()
    assert "rlhf (ppo): eval reward 1 x exact + 0.5 x rm2 " in out.out, out.err
    assert "someone/rm: the Hugging Face Hub's files" in out.err and "is not the policy's" not in out.err


def test_a_ppo_resume_with_other_weights_normalizes_the_new_sum(tmp_path, capsys):
    """The saved (shift, scale) of PPO's scores is the first batch's of the run's weighted sum: a resume with
    other weights optimises another sum, and a reward model that now counts (weight 0 -> 1) must be normalized
    as the README says ('PPO normalises the sum when a reward model counts in it'), not left at (0, 1)."""
    from tritongpt.cli import main

    argv = [*_cli_setup(tmp_path), "--algo", "ppo", "--reward", "exact", "--reward", str(tmp_path / "rm.st"),
            "--out-dir", str(tmp_path / "run")]
    assert main([*argv, "--reward-weights", "1", "0", "--iterations", "1"]) == 0
    state = torch.load(tmp_path / "run" / "ckpt-0000001" / "state.pt", weights_only=False)
    assert state["score_norm"] == (0.0, 1.0)  # verifier alone counts: left as it is
    assert main([*argv, "--reward-weights", "1", "1", "--iterations", "2", "--resume"]) == 0
    assert "--reward-weights [1.0, 1.0] (the run had [1.0, 0.0])" in capsys.readouterr().err
    state = torch.load(tmp_path / "run" / "ckpt-0000002" / "state.pt", weights_only=False)
    assert state["score_norm"] != (0.0, 1.0)  # the new sum, with the reward model in it: normalized
    # the same weights: the run's own normalization goes on
    assert main([*argv, "--reward-weights", "1", "1", "--iterations", "3", "--resume"]) == 0
    again = torch.load(tmp_path / "run" / "ckpt-0000003" / "state.pt", weights_only=False)
    assert again["score_norm"] == state["score_norm"]
