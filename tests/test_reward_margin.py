"""The reward model's two options from TRL's RewardTrainer: a pair's own `margin` (Llama 2's: -log sigmoid(r_chosen -
r_rejected - margin)) and `--center-rewards-coefficient` (Eisenstein et al. 2023: C * mean((r_chosen +
r_rejected)^2) added to the loss). The loss against float64 formulas, value and gradient; the reader's margins and
its refusals; training that honours each (a margin widens the learned gap, centering pulls the scores' mean to 0);
the CLI and a resume that changes the coefficient."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from test_rlhf import CTX, WordTokenizer, compact_template, tiny_config
from tritongpt.errors import UserError
from tritongpt.model.gpt import GPTModel
from tritongpt.train.common import MetricsLog
from tritongpt.train.loop import TrainArgs
from tritongpt.train.preference import (PreferencePair, encode_pairs, pair_batch, read_preference_file,
                                        task_preferences)
from tritongpt.train.reward import RewardModel, make_reward_loss, pair_margins, train_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = "uppercase,lowercase"


@pytest.fixture(scope="module")
def data():
    train = task_preferences(400, seed=0, template=compact_template, split="train", families=FAMILIES)
    val = task_preferences(64, seed=0, template=compact_template, split="val", families=FAMILIES)
    tok = WordTokenizer([p.prompt + p.chosen.upper() + p.chosen.lower() for p in train + val])

    def fits(p):
        return len(tok.encode(p.prompt)) + max(len(tok.encode(p.chosen)), len(tok.encode(p.rejected))) + 1 <= CTX

    def easy(ps):  # test_rlhf's easy_reward's target: an UPPERCASE answer over the same in lowercase
        return [PreferencePair(p.prompt, p.chosen.upper(), p.chosen.lower()) for p in ps
                if p.chosen.upper() != p.chosen.lower() and fits(p)]

    return tok, easy(train), easy(val)


def test_the_loss_is_bradley_terry_with_margins_plus_the_centering_term(data):
    """Value and every parameter's gradient against the formula on the model's own scores, in float64."""
    tok, train, _ = data
    torch.manual_seed(0)
    rm = RewardModel(GPTModel(tiny_config(tok.vocab_size))).double()
    with torch.no_grad():
        rm.head.bias.fill_(0.7)  # off-centre, so the centering term is not ~0
    enc = encode_pairs(train[:6], tok, CTX)
    for e, m in zip(enc, (1.5, -0.5, 0.0, 2.0, 0.25, 3.0)):
        e.margin = m
    idx, lengths, _ = pair_batch(enc, tok.eot_id)
    margins = pair_margins(enc).double()
    for c in (0.0, 0.3):
        loss = make_reward_loss(c)(rm, (idx, lengths, margins))
        got = torch.autograd.grad(loss, list(rm.parameters()))
        rc, rr = rm(idx, lengths).chunk(2)
        want = F.softplus(-(rc - rr - margins)).mean() + c * ((rc + rr) ** 2).mean()
        expected = torch.autograd.grad(want, list(rm.parameters()))
        assert loss.item() == pytest.approx(want.item(), rel=1e-12)
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-10, atol=1e-14)
        assert c == 0 or abs(loss.item() - make_reward_loss(0.0)(rm, (idx, lengths, margins)).item()) > 1e-3
    # no margins (None: every pair's 0) is the plain loss
    plain = make_reward_loss()(rm, (idx, lengths, None))
    rc, rr = rm(idx, lengths).chunk(2)
    assert plain.item() == pytest.approx(F.softplus(-(rc - rr)).mean().item(), rel=1e-12)
    assert pair_margins([copy.copy(e) for e in enc[:0]] + encode_pairs(train[:2], tok, CTX)) is None


def test_margins_are_read_with_their_pairs_and_bad_ones_refused(tmp_path):
    recs = [{"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 3},
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}], "margin": 0.5}]
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(recs[0]) + "\n")
    assert read_preference_file(path) == [PreferencePair("2+2=", "4", "5", margin=3.0)]
    path.write_text(json.dumps(recs[1]) + "\n")
    assert read_preference_file(path)[0].margin == 0.5
    path.write_text(json.dumps({k: v for k, v in recs[0].items() if k != "margin"}) + "\n")
    assert read_preference_file(path)[0].margin is None
    path.write_text(json.dumps({**recs[0], "margin": None}) + "\n")  # null: no margin (a Parquet null: no field)
    assert read_preference_file(path)[0].margin is None
    for bad in ("3", True, float("nan"), float("inf"), [1]):
        path.write_text(json.dumps({**recs[0], "margin": bad}) + "\n")
        with pytest.raises(UserError, match=rf"{path}: record 0 \(line 1\): field 'margin' must be a finite number"):
            read_preference_file(path)
    plain = {k: v for k, v in recs[0].items() if k != "margin"}
    for first, second, which, other in ((recs[0], plain, "record 1", "record 0"),
                                        (plain, recs[0], "record 0", "record 1")):
        path.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
        with pytest.raises(UserError, match=rf"{which} \(line \d\) has no 'margin' but {path}: {other} \(line \d\) "
                                            "has one: give every pair a margin, or none"):
            read_preference_file(path)


def _train(tok, train, val, tmp_path, name, **kw):
    torch.manual_seed(0)
    rm = RewardModel(GPTModel(tiny_config(tok.vocab_size)))
    with torch.no_grad():
        rm.head.bias.fill_(3.0)  # every score starts near 3: Bradley-Terry alone never moves their mean
    args = TrainArgs(out_dir=str(tmp_path / name), max_steps=40, batch_size=16, lr=3e-3, min_lr=3e-4,
                     warmup_steps=5, eval_every=0, ckpt_every=0, log_every=0, weight_decay=0.0, device="cpu",
                     kernels="reference", seed=0)
    return train_reward_model(rm, tok, train, val, args, **kw)


def test_a_margin_widens_the_gap_and_centering_pulls_the_scores_to_zero(data, tmp_path):
    tok, train, val = data
    plain = _train(tok, train, val, tmp_path, "plain")
    wide = _train(tok, [PreferencePair(p.prompt, p.chosen, p.rejected, margin=20.0) for p in train], val,
                  tmp_path, "wide")
    centred = _train(tok, train, val, tmp_path, "centred", center_rewards_coefficient=0.5)
    print(f"held-out margin {plain['val_margin']:.3f} plain, {wide['val_margin']:.3f} with margins 20; "
          f"mean score {plain['val_score']:.3f} plain, {centred['val_score']:.3f} centred")
    assert plain["val_acc"] >= 0.8 and wide["val_acc"] >= 0.8 and centred["val_acc"] >= 0.8
    assert wide["val_margin"] > plain["val_margin"] + 2.0  # 13.0 -> 16.0 here: pushed on past BT's stop
    assert abs(plain["val_score"]) > 1.5 and abs(centred["val_score"]) < 0.3 * abs(plain["val_score"])
    assert MetricsLog(tmp_path / "centred" / "metrics.jsonl").rows()[-1]["val_score"] == centred["val_score"]


def test_the_cli_takes_both_and_a_resume_names_a_changed_coefficient(tmp_path, capsys):
    from tritongpt.cli import main

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "margin": i % 3})
                            + "\n" for i in range(12)))
    flags = ["reward", "--model", "tiny", "--data", str(path), "--batch-size", "4", "--eval-every", "0",
             "--device", "cpu", "--kernels", "reference", "--out-dir", str(tmp_path / "run")]
    assert main([*flags, "--max-steps", "1", "--center-rewards-coefficient", "0.01"]) == 0
    capsys.readouterr()
    assert main([*flags, "--max-steps", "2", "--resume"]) == 0
    assert "--center-rewards-coefficient 0.0 (0.01)" in capsys.readouterr().err  # recorded though 0
    for bad in ("-1", "inf", "nan"):  # refused before the set-up writes anything
        assert main([*flags[:-1], str(tmp_path / "bad"), "--center-rewards-coefficient", bad]) == 2
        assert "--center-rewards-coefficient must be a finite number >= 0" in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
