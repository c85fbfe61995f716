"""The shared Trainer (train/loop.py): accumulation, exact resume, schedule, decay groups,
NaN stop, checkpoints, both kernel paths through one loop, and DDP with two CPU processes."""
import argparse
import copy
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import plot_stub
from parity import assert_paths_grads_float64s, record_step_grads
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.toggle import KERNEL_NAMES
from tritongpt.train import common
from tritongpt.train.loop import TrainArgs, Trainer, add_train_args, loss_eval_fn

VOCAB, CTX = 61, 16
TINY = dict(vocab_size=VOCAB, context_length=CTX, n_embd=32, n_layer=2, n_head=2)


pytestmark = pytest.mark.usefixtures("one_thread")
no_plots, real_plots = plot_stub.no_plots, plot_stub.real_plots  # (empty PNGs unless a test reads one)


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(**{**TINY, **over}))


def synthetic_tokens(n=4000, seed=0):
    """Mostly a repeating pattern with some noise, so the loss has something to learn."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) * 7 % VOCAB
    noise = torch.randint(0, VOCAB, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.2, noise, base)


def make_get_batch(tokens, batch_size, block=CTX, record=None):
    def get_batch(split, gen):
        ix = torch.randint(len(tokens) - block - 1, (batch_size,), generator=gen)
        x = torch.stack([tokens[i:i + block] for i in ix])
        y = torch.stack([tokens[i + 1:i + block + 1] for i in ix])
        if record is not None:
            record.append((x, y))
        return x, y
    return get_batch


def loss_fn(model, batch):
    x, y = batch
    return model(x, targets=y)


def args_for(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), max_steps=6, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                eval_every=0, ckpt_every=0, log_every=0, sample_every=0, device="cpu", dtype="fp32",
                kernels="reference", seed=7)
    base.update(kw)
    return TrainArgs(**base)


def rows(out_dir):
    return common.MetricsLog(Path(out_dir) / "metrics.jsonl").rows()


# -- gradient accumulation ------------------------------------------------------------------------------------
def test_grad_accum_two_halves_equal_one_double_batch(tmp_path):
    torch.manual_seed(3)
    x = torch.randint(0, VOCAB, (8, CTX))
    y = torch.randint(0, VOCAB, (8, CTX))
    halves = iter([(x[:4], y[:4]), (x[4:], y[4:])])

    def run(model, get_batch, out, **kw):
        t = Trainer(model, args_for(out, max_steps=1, warmup_steps=0, min_lr=3e-3, **kw), loss_fn, get_batch)
        grads = {}
        step = t.optimizer.step

        def snapshot_then_step(*a, **k):  # the gradients the optimizer sees (after clipping)
            grads.update({n: p.grad.clone() for n, p in t.raw_model.named_parameters()})
            return step(*a, **k)

        t.optimizer.step = snapshot_then_step
        out = t.fit()
        return out, grads, t.raw_model

    base = tiny_model()
    r1, g1, m1 = run(copy.deepcopy(base), lambda s, g: next(halves), tmp_path / "accum", grad_accum=2, batch_size=4)
    r2, g2, m2 = run(copy.deepcopy(base), lambda s, g: (x, y), tmp_path / "full", grad_accum=1, batch_size=8)
    assert abs(r1["loss"] - r2["loss"]) < 1e-6 * abs(r2["loss"])
    gn1, gn2 = rows(tmp_path / "accum")[0]["grad_norm"], rows(tmp_path / "full")[0]["grad_norm"]
    # Adam's first step is nearly scale-free, so the norm is what catches a wrong 1/grad_accum
    assert abs(gn1 - gn2) < 1e-5 * gn2, (gn1, gn2)
    for n in g2:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-7, msg=n)
    # Adam's first step is lr * g / (|g| + eps): on entries with |g| near eps (1e-8) a gradient
    # difference far inside the tolerance above moves the update by a visible fraction of lr,
    # and which entries those are depends on the CPU's summation order. Compare the rest.
    # (The key bias's gradient is exactly 0 in theory -- softmax ignores a per-query constant --
    # so it is all noise and skipped entirely.)
    compared = 0
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        well_above_eps = g2[n].abs() > 1e-7
        compared += int(well_above_eps.sum())
        torch.testing.assert_close(p1[well_above_eps], p2[well_above_eps], rtol=1e-5, atol=1e-6, msg=n)
    assert compared > 0.9 * sum(p.numel() for p in m2.parameters())


def weighted_loss_fn(model, batch):
    """SFT's shape of loss: (sum over counted targets, their count); here every target divisible
    by 3 is ignored, so micro-batches count different numbers of them."""
    x, y = batch
    y = torch.where(y % 3 == 0, -100, y)
    loss, n = model(x, targets=y, reduction="sum"), (y != -100).sum()
    aux = common.moe_aux_term(model)  # a mixture of experts' load-balancing loss, once per target as sft_loss adds it
    return (loss if aux is None else loss + aux * n), n


def test_token_weighted_accumulation_equals_one_batch_of_all_tokens(tmp_path):
    """A loss_fn returning (sum, count): the step's loss and gradient are the mean over every counted
    target, so two micro-batches that count 10 and 60 targets train as one batch of both."""
    torch.manual_seed(3)
    x = torch.randint(0, VOCAB, (8, CTX))
    y = torch.randint(1, VOCAB, (8, CTX))
    y[:4, 3:] = 3 * torch.randint(0, VOCAB // 3, (4, CTX - 3))  # the first half counts 12 targets at most
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    counts = [int(weighted_loss_fn(tiny_model(), h)[1]) for h in halves]
    assert counts[0] <= 12 < 4 * counts[0] < counts[1], counts

    def run(get_batch, out, **kw):
        t = Trainer(tiny_model(), args_for(out, max_steps=1, warmup_steps=0, min_lr=3e-3, **kw),
                    weighted_loss_fn, get_batch)
        grads = {}
        step = t.optimizer.step

        def snapshot_then_step(*a, **k):
            grads.update({n: p.grad.clone() for n, p in t.raw_model.named_parameters()})
            return step(*a, **k)

        t.optimizer.step = snapshot_then_step
        return t.fit(), grads

    it = iter(halves)
    r1, g1 = run(lambda s, g: next(it), tmp_path / "accum", grad_accum=2, batch_size=4)
    r2, g2 = run(lambda s, g: (x, y), tmp_path / "full", grad_accum=1, batch_size=8)
    def grad_norm_of(weigh):  # the gradient's norm at the initial weights, the halves weighed by `weigh`
        model = tiny_model()
        sums = [weighted_loss_fn(model, h)[0] for h in halves]
        loss = weigh(sums)
        loss.backward()
        return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()), float(loss.detach())

    token_norm, token_mean = grad_norm_of(lambda sums: sum(sums) / sum(counts))
    mean_of_means_norm, _ = grad_norm_of(lambda sums: (sums[0] / counts[0] + sums[1] / counts[1]) / 2)
    assert abs(token_norm - mean_of_means_norm) > 0.1 * token_norm  # the two weightings differ here
    assert r1["loss"] == pytest.approx(token_mean, rel=1e-5) and r2["loss"] == pytest.approx(token_mean, rel=1e-5)
    gn1, gn2 = rows(tmp_path / "accum")[0]["grad_norm"], rows(tmp_path / "full")[0]["grad_norm"]
    assert abs(gn1 - gn2) < 1e-5 * gn2 and gn2 == pytest.approx(token_norm, rel=1e-5), (gn1, gn2, token_norm)
    for n in g2:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-7, msg=n)


def test_a_step_with_no_counted_target_is_named(tmp_path):
    def nothing_counted(model, batch):
        x, y = batch
        return model(x, targets=torch.full_like(y, -100), reduction="sum"), (y < 0).sum()

    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=2), nothing_counted,
                make_get_batch(synthetic_tokens(), 2))
    with pytest.raises(UserError, match="no batch of step 1 has a counted target"):
        t.fit()


def test_eval_of_a_weighted_loss_is_its_token_mean():
    model = tiny_model()
    get_batch = make_get_batch(synthetic_tokens(), 2)
    gen = torch.Generator().manual_seed(5)
    batches = [get_batch("val", gen) for _ in range(3)]
    with torch.no_grad():
        parts = [weighted_loss_fn(model, b) for b in batches]
        got = loss_eval_fn(weighted_loss_fn, get_batch, 3, seed=5)(model)["val_loss"]
    assert got == pytest.approx(sum(float(s) for s, _ in parts) / sum(int(n) for _, n in parts), rel=1e-6)


# -- exact resume ----------------------------------------------------------------------------------------------
def test_resume_after_crash_is_bitwise_identical(tmp_path):
    tokens = synthetic_tokens()
    common_kw = dict(max_steps=8, grad_accum=2, ckpt_every=4, eval_every=4, eval_batches=2)

    def trainer(out, model, **kw):
        gb = make_get_batch(tokens, 3)
        return Trainer(model, args_for(out, **{**common_kw, **kw}), loss_fn, gb,
                       eval_fn=loss_eval_fn(loss_fn, gb, 2))

    straight = trainer(tmp_path / "a", tiny_model(0, dropout=0.1))  # dropout: the RNG must resume too
    straight.fit()

    # the same run, killed while taking step 6 (after step 5 was logged; last checkpoint: 4)
    crashing = trainer(tmp_path / "b", tiny_model(0, dropout=0.1))
    calls = {"n": 0}
    gb = crashing.get_batch

    def dying_get_batch(split, gen):
        calls["n"] += 1
        if calls["n"] > 2 * 5:
            raise KeyboardInterrupt
        return gb(split, gen)

    crashing.get_batch = dying_get_batch
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert [r["step"] for r in rows(tmp_path / "b") if "loss" in r][-1] == 5

    # a fresh process would build the model from another seed: the checkpoint must win
    resumed = trainer(tmp_path / "b", tiny_model(99, dropout=0.1), resume="latest")
    out = resumed.fit()
    assert out["step"] == 8
    for (n, p), q in zip(straight.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"
    a_rows, b_rows = rows(tmp_path / "a"), rows(tmp_path / "b")
    # steps 6..8 logged once (the crashed run's step-5 row was dropped and redone), same losses
    assert [r["step"] for r in b_rows if "loss" in r] == list(range(1, 9))
    la = [r["loss"] for r in a_rows if "loss" in r]
    lb = [r["loss"] for r in b_rows if "loss" in r]
    assert la == lb
    assert [r["val_loss"] for r in a_rows if "val_loss" in r] == [r["val_loss"] for r in b_rows if "val_loss" in r]


class SequentialData:
    """Batches in a fixed order that ignores the batch generator: only the position it saves
    through data_state can make a resume continue where the run stopped."""

    def __init__(self, tokens, batch_size):
        self.tokens, self.batch_size, self.pos, self.loaded = tokens, batch_size, 0, []

    def get_batch(self, split, gen):
        starts = [(self.pos + i) * 37 % (len(self.tokens) - CTX - 1) for i in range(self.batch_size)]
        self.pos += self.batch_size
        return (torch.stack([self.tokens[s:s + CTX] for s in starts]),
                torch.stack([self.tokens[s + 1:s + CTX + 1] for s in starts]))

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, d):
        self.loaded.append(dict(d))
        self.pos = d["pos"]


def test_resume_hands_the_saved_data_state_back(tmp_path):
    """A data_state's position is saved in the checkpoint and restored on resume: the resumed
    run sees the batches an uninterrupted one would, and ends with the same weights."""
    tokens = synthetic_tokens()

    def run(out, **kw):
        d = SequentialData(tokens, 3)
        t = Trainer(tiny_model(0), args_for(out, max_steps=4, ckpt_every=2, **kw), loss_fn, d.get_batch,
                    data_state=d)
        t.fit()
        return t, d

    straight, _ = run(tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "ckpt-0000002", tmp_path / "b" / "ckpt-0000002")
    resumed, d = run(tmp_path / "b", resume="latest")
    assert d.loaded == [{"pos": 6}], f"load_state_dict got {d.loaded}"
    for (n, p), q in zip(straight.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q), f"{n} differs after resume"


def test_eval_and_sample_do_not_move_the_training_rng(tmp_path):
    """eval_fn and sample_fn that draw from torch's global RNG must not change dropout masks of
    the training steps: the weights equal a run without them, bitwise."""
    gb = make_get_batch(synthetic_tokens(), 2)

    def eval_fn(model):
        return {"noise": torch.rand(()).item()}

    def sample_fn(model):
        return str(torch.randint(0, VOCAB, (5,)).tolist())

    with_side = Trainer(tiny_model(0, dropout=0.2), args_for(tmp_path / "a", max_steps=3, eval_every=1,
                                                             sample_every=1), loss_fn, gb,
                        eval_fn=eval_fn, sample_fn=sample_fn)
    with_side.fit()
    plain = Trainer(tiny_model(0, dropout=0.2), args_for(tmp_path / "b", max_steps=3), loss_fn, gb)
    plain.fit()
    assert "noise" in rows(tmp_path / "a")[0]  # the eval did run (at step 0, then every step)
    for (n, p), q in zip(with_side.raw_model.named_parameters(), plain.raw_model.parameters()):
        assert torch.equal(p, q), f"{n}: eval/sample changed the training run"


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    t = Trainer(tiny_model(), args_for(tmp_path, resume="latest"), loss_fn, make_get_batch(synthetic_tokens(), 2))
    with pytest.raises(UserError, match="no checkpoint"):
        t.fit()
    # another trainer's checkpoint (same model, so the weights would load) is refused by name
    gb = make_get_batch(synthetic_tokens(), 2)
    Trainer(tiny_model(), args_for(tmp_path, max_steps=1), loss_fn, gb, name="pretrain").fit()
    t = Trainer(tiny_model(), args_for(tmp_path, resume="latest"), loss_fn, gb, name="sft")
    with pytest.raises(UserError, match=r"is a checkpoint of a pretrain run, not of sft \(to start from its weights, use --init\)"):
        t.fit()
    # a damaged state.pt (a copy cut short, a file of something else) is named, not torch's traceback
    state = tmp_path / "ckpt-0000001" / "state.pt"
    for content, match in ((state.read_bytes()[:1000], "is not a readable checkpoint state"),
                           (b"", r"is not a readable checkpoint state \(EOFError"),
                           (b"some text\n", r"is not a readable checkpoint state \(UnpicklingError"),
                           (None, "is not a checkpoint state .it holds a list")):
        if content is None:
            torch.save([1], state)
        else:
            state.write_bytes(content)
        t = Trainer(tiny_model(), args_for(tmp_path, resume="latest"), loss_fn, gb, name="pretrain")
        with pytest.raises(UserError, match="ckpt-0000001/state.pt " + match):
            t.fit()
    # a folder with the weights but no state.pt (a copy of the model alone) is named as such
    state.unlink()
    t = Trainer(tiny_model(), args_for(tmp_path, resume=str(state.parent)), loss_fn, gb, name="pretrain")
    with pytest.raises(UserError, match="checkpoint state not found: .*ckpt-0000001/state.pt"):
        t.fit()


def resave_config(weights, edit):
    """Rewrite a checkpoint's weights file with edit(its saved model config) as the config: a dict,
    or None for no config at all (a bare weights file)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config = edit(json.loads(meta.pop("config")))
    save_file(tensors, str(weights), metadata=meta if config is None else {**meta, "config": json.dumps(config)})


def without(*fields):
    """An edit for resave_config: the saved config as from before these fields."""
    return lambda config: {k: v for k, v in config.items() if k not in fields}


def test_a_resume_refuses_another_logit_softcap_and_reads_older_checkpoints_as_uncapped(tmp_path):
    """The same weights soft-capped or not are other models: a resume with another cap is refused.
    A checkpoint whose saved config predates the field is uncapped (resumed as such, and refused
    to a capped model); one with no saved config at all is not compared, as for dropout."""
    gb = make_get_batch(synthetic_tokens(), 2)
    Trainer(tiny_model(logit_softcap=15.0), args_for(tmp_path, max_steps=1), loss_fn, gb).fit()
    weights = tmp_path / "ckpt-0000001" / "model.safetensors"

    def resume(**cfg):  # at --max-steps already: the checks, the weights loaded, no step
        return Trainer(tiny_model(**cfg), args_for(tmp_path, max_steps=1, resume="latest"), loss_fn, gb).fit()

    with pytest.raises(UserError, match=r"soft-caps its logits at 15, this run's at 0 \(0: none\): "
                                        r"pass --logit-softcap 15"):
        resume()
    resume(logit_softcap=15.0)
    resave_config(weights, without("logit_softcap"))
    assert "logit_softcap" not in common.saved_model_config(weights)
    resume()
    with pytest.raises(UserError, match=r"soft-caps its logits at 0, this run's at 15"):
        resume(logit_softcap=15.0)
    resave_config(weights, lambda config: None)
    assert common.saved_model_config(weights) == {}
    resume(logit_softcap=15.0)
    # the other trainers take their model, cap included, from --init: no flag to name there
    sft = tmp_path / "sft"
    Trainer(tiny_model(logit_softcap=15.0), args_for(sft, max_steps=1), loss_fn, gb, name="sft").fit()
    with pytest.raises(UserError, match=r"at 15, this run's at 0 \(0: none\): resume with the run's own --init$"):
        Trainer(tiny_model(), args_for(sft, max_steps=1, resume="latest"), loss_fn, gb, name="sft").fit()


def test_rng_state_restores_every_generator():
    """rng_state / set_rng_state (what a resume restores): Python's, NumPy's and torch's draws
    after a restore repeat those after the capture."""
    import random

    import numpy as np

    common.set_seed(3)
    state = common.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(()).item())
    common.set_seed(4)
    common.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == first
    # set_seed seeds all three: a seed repeats their draws, another seed changes each of them
    seed = int(torch.randint(0, 2**62, ()))
    draws = []
    for s in (seed, seed, seed + 1):
        common.set_seed(s)
        draws.append((random.random(), np.random.rand(), torch.rand(()).item()))
    assert draws[0] == draws[1] and all(a != b for a, b in zip(draws[0], draws[2])), draws
    with pytest.raises(UserError, match="--seed must be a 64-bit integer"):  # not torch's overflow
        common.set_seed(2**63)


# -- schedule and decay groups -------------------------------------------------------------------------------
def test_lr_warmup_then_cosine_to_floor(tmp_path):
    a = args_for(tmp_path, max_steps=12, warmup_steps=3, lr=1e-3, min_lr=1e-4, batch_size=2)
    t = Trainer(tiny_model(), a, loss_fn, make_get_batch(synthetic_tokens(), 2))
    stepped, step = [], t.optimizer.step

    def record_then_step(*args, **kw):  # the rate the optimizer steps with, not only the one logged
        stepped.append([g["lr"] for g in t.optimizer.param_groups])
        return step(*args, **kw)

    t.optimizer.step = record_then_step
    t.fit()
    lrs = [r["lr"] for r in rows(tmp_path) if "lr" in r]
    assert stepped == [[lr, lr] for lr in lrs]
    assert len(lrs) == 12
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])          # linear warmup to the peak
    assert all(x >= y for x, y in zip(lrs[2:], lrs[3:]))                  # then never increases
    # cosine from the peak (step index 3) towards the floor, reached at max_steps
    cosine = [1e-4 + 0.5 * (1 + math.cos(math.pi * (s - 3) / 9)) * 9e-4 for s in range(3, 12)]
    assert lrs[3:] == pytest.approx(cosine, rel=1e-12)
    assert 1e-4 < lrs[-1] < 1.3e-4
    assert common.lr_at(12, 1e-3, 3, 12, 1e-4) == 1e-4 and common.lr_at(500, 1e-3, 3, 12, 1e-4) == 1e-4


def test_lr_schedules_wsd_linear_constant(tmp_path):
    """After the warmup: wsd holds the peak until the last --decay-fraction of the run, then falls
    as 1 - sqrt(progress) to the floor; linear falls in a straight line; constant stays. A wsd
    run's rates before its decay are those of a longer wsd run (what lets it be extended)."""
    lr, floor = 1e-3, 1e-4
    wsd = [common.lr_at(s, lr, 2, 20, floor, "wsd", 0.25) for s in range(22)]
    assert wsd[:2] == pytest.approx([5e-4, 1e-3]) and wsd[2:15] == [lr] * 13
    assert wsd[15:20] == pytest.approx([floor + (1 - math.sqrt(k / 5)) * 9e-4 for k in range(5)], rel=1e-12)
    assert wsd[20:] == [floor, floor]
    longer = [common.lr_at(s, lr, 2, 40, floor, "wsd", 0.25) for s in range(15)]
    assert longer == wsd[:15]
    linear = [common.lr_at(s, lr, 2, 12, floor, "linear") for s in range(2, 13)]
    assert linear == pytest.approx([floor + (1 - k / 10) * 9e-4 for k in range(10)] + [floor], rel=1e-12)
    assert [common.lr_at(s, lr, 2, 12, floor, "constant") for s in (0, 2, 11, 50)] == [5e-4, lr, lr, lr]
    # a warmup past the decay's start: the decay starts after the warmup, not inside it
    assert common.lr_at(8, lr, 8, 10, floor, "wsd", 0.5) == lr
    assert common.lr_at(9, lr, 8, 10, floor, "wsd", 0.5) == pytest.approx(floor + (1 - math.sqrt(0.5)) * 9e-4)
    # the Trainer steps with them
    a = args_for(tmp_path, max_steps=10, warmup_steps=2, lr=lr, min_lr=floor, batch_size=2, lr_schedule="wsd",
                 decay_fraction=0.3)
    Trainer(tiny_model(), a, loss_fn, make_get_batch(synthetic_tokens(), 2)).fit()
    logged = [r["lr"] for r in rows(tmp_path) if "lr" in r]
    assert logged == pytest.approx([common.lr_at(s, lr, 2, 10, floor, "wsd", 0.3) for s in range(10)], rel=1e-12)
    assert logged[2:7] == [lr] * 5 and logged[7] == lr and logged[8] < lr


def test_wsd_rounds_its_decay_to_whole_steps_and_may_decay_the_whole_run(tmp_path):
    """--decay-fraction of --max-steps rounded to the nearest step (0.2 of 13 is 2.6: the last 3
    steps decay, not 2), and 1 is allowed: the decay starts right after the warmup. A schedule
    lr_at does not know is an error there too, not some rate."""
    lr, floor = 1e-3, 1e-4
    wsd = [common.lr_at(s, lr, 0, 13, floor, "wsd", 0.2) for s in range(13)]
    assert wsd[:10] == [lr] * 10 and wsd[11] < wsd[10] == pytest.approx(lr, rel=1e-12)
    assert wsd[10:] == pytest.approx([floor + (1 - math.sqrt(k / 3)) * 9e-4 for k in range(3)], rel=1e-12)
    assert [common.lr_at(s, lr, 0, 20, floor, "wsd") for s in range(20)] == \
        [common.lr_at(s, lr, 0, 20, floor, "wsd", 0.2) for s in range(20)]  # 0.2 is lr_at's default too
    with pytest.raises(UserError, match="--lr-schedule must be one of"):
        common.lr_at(5, lr, 2, 12, floor, "cosin")
    args_for(tmp_path, lr_schedule="wsd", decay_fraction=1.0).validate()
    whole = [common.lr_at(s, lr, 2, 10, floor, "wsd", 1.0) for s in range(2, 10)]
    assert whole == pytest.approx([floor + (1 - math.sqrt(k / 8)) * 9e-4 for k in range(8)], rel=1e-12)


def test_a_resume_names_a_changed_lr_schedule_and_decay_fraction(tmp_path, capsys):
    """Both change the rates the resumed run steps with (a wsd run continued as cosine, or with a
    longer decay), so a resume that changes them says so, as for --lr."""
    get = make_get_batch(synthetic_tokens(), 2)
    first = dict(max_steps=1, batch_size=2, lr_schedule="wsd", decay_fraction=0.2)
    Trainer(tiny_model(), args_for(tmp_path, **first), loss_fn, get).fit()
    capsys.readouterr()
    then = dict(max_steps=2, batch_size=2, lr_schedule="wsd", decay_fraction=0.5, resume="latest")
    Trainer(tiny_model(), args_for(tmp_path, **then), loss_fn, get).fit()
    err = capsys.readouterr().err
    assert ("note: resuming with --max-steps 2 (the run had 1), --decay-fraction 0.5 (0.2): the run goes on "
            "differently") in err, err
    then = dict(max_steps=3, batch_size=2, lr_schedule="cosine", resume="latest")  # cosine takes no --decay-fraction
    Trainer(tiny_model(), args_for(tmp_path, **then), loss_fn, get).fit()
    err = capsys.readouterr().err
    assert ("note: resuming with --max-steps 3 (the run had 2), --lr-schedule cosine (wsd), --decay-fraction 0.2 "
            "(0.5): the run goes on differently") in err, err


def test_a_resume_before_the_wsd_decay_with_more_steps_extends_the_run(tmp_path, capsys):
    """wsd's stable phase does not depend on --max-steps: a run resumed with more steps before
    its decay began had the rates of a run planned that long, and the note says it is extended;
    the rates logged are that run's, step for step."""
    get = make_get_batch(synthetic_tokens(), 2)
    first = dict(max_steps=2, batch_size=2, warmup_steps=0, lr_schedule="wsd")  # 0.2 of 2 steps: no decay
    Trainer(tiny_model(), args_for(tmp_path, **first), loss_fn, get).fit()
    capsys.readouterr()
    Trainer(tiny_model(), args_for(tmp_path, **{**first, "max_steps": 4}, resume="latest"), loss_fn, get).fit()
    err = capsys.readouterr().err
    assert ("note: resuming with --max-steps 4 (the run had 2): up to step 2 the wsd schedule gives the same "
            "learning rates over 4 steps, so the run goes on as if planned with 4 steps") in err, err
    assert "goes on differently" not in err
    a = args_for(tmp_path, **{**first, "max_steps": 4})
    assert [r["lr"] for r in rows(tmp_path) if "lr" in r] == \
        [common.lr_at(s, a.lr, 0, 4, a.min_lr, "wsd", a.decay_fraction) for s in range(4)]


@pytest.mark.parametrize("field,value,message", [("lr_schedule", "cosin", "--lr-schedule must be one of cosine, wsd"),
                                                 ("decay_fraction", 0.0, "--decay-fraction must be in"),
                                                 ("decay_fraction", 1.5, "--decay-fraction must be in"),
                                                 ("decay_fraction", float("nan"), "--decay-fraction must be in"),
                                                 # the default cosine has no decay phase: it was ignored, silently
                                                 ("decay_fraction", 0.5, "--decay-fraction 0.5 is --lr-schedule")])
def test_lr_schedule_flags_are_checked(tmp_path, field, value, message):
    with pytest.raises(UserError, match=message):
        args_for(tmp_path, **{field: value}).validate()


def test_muon_takes_the_block_matrices_and_adamw_the_rest(tmp_path):
    """--optimizer muon: torch.optim.Muon on exactly the blocks' Linear weights, AdamW (decay groups
    as before) on the rest; one step of the pair moves each parameter as that optimizer alone
    would from the same gradients, and the learning rate reaches both."""
    model = tiny_model(3)
    opt = common.build_optimizer(model, 1e-2, 0.1, kind="muon")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    want = sorted(f"trf_blocks.{i}.{m}.weight" for i in range(TINY["n_layer"])
                  for m in ("att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.fc1", "ff.fc2"))
    assert muon == want
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert adamw == set(names.values()) - set(want) and "tok_emb.weight" in adamw
    x, y = make_get_batch(synthetic_tokens(), 2)("train", torch.Generator().manual_seed(0))
    twin = copy.deepcopy(model)
    by_name = dict(twin.named_parameters())
    alone = (torch.optim.Muon([by_name[n] for n in want], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
             torch.optim.AdamW([{"params": [by_name[names[id(p)]] for p in g["params"]],
                                 "weight_decay": g["weight_decay"]} for g in opt.adamw.param_groups],
                               lr=1e-2, betas=(0.9, 0.95)))
    for m in (model, twin):
        m(x, targets=y).backward()
    common.set_lr(opt, 1e-2)
    opt.step()
    for o in alone:
        o.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, by_name[n]), n
    common.set_lr(opt, 5e-3)
    assert {g["lr"] for g in opt.param_groups} == {5e-3} and len(opt.param_groups) == 1 + len(opt.adamw.param_groups)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_muon_training_resumes_bitwise_and_refuses_another_optimizer(tmp_path):
    """A Muon run checkpointed at step 3 and resumed to 6 ends where an unbroken run does (its
    momentum and AdamW's moments are saved); resuming it with AdamW is refused by name, and so is
    LoRA with Muon."""
    tokens = synthetic_tokens()

    def run(out, steps, **kw):
        t = Trainer(tiny_model(1), args_for(out, max_steps=steps, ckpt_every=3, optimizer="muon", **kw), loss_fn,
                    make_get_batch(tokens, 2))
        t.fit()
        return t

    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume="latest")
    for (n, p), q in zip(straight.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q), n
    losses = [r["loss"] for r in rows(tmp_path / "a") if "loss" in r]
    assert losses[-1] < losses[0]
    with pytest.raises(UserError, match="trained with --optimizer muon, not adamw: pass --optimizer muon"):
        Trainer(tiny_model(1), args_for(tmp_path / "b", max_steps=8, resume="latest"), loss_fn,
                make_get_batch(tokens, 2)).fit()
    from tritongpt.model.lora import add_lora

    with pytest.raises(UserError, match="not LoRA's low-rank factors"):
        common.build_optimizer(add_lora(tiny_model(1), 2), 1e-3, kind="muon")
    with pytest.raises(UserError, match="--optimizer must be one of adamw, muon"):
        args_for(tmp_path, optimizer="sgd").validate()


@pytest.mark.parametrize("m, n, adjust", [(5, 8, "match_rms_adamw"), (8, 5, "original")])
def test_muon_steps_each_expert_of_a_stack_as_a_matrix_of_its_own(m, n, adjust):
    """ExpertMuon on an [E, m, n] stack (beside a 2-D matrix): two steps move expert e exactly as
    torch's Muon moves a separate [m, n] parameter with gradients grad[e] (momentum, Nesterov,
    Newton-Schulz, weight decay, and the lr adjusted for [m, n]: from [E, m, n]'s first two sizes
    it would be another rate in both of these cases)."""
    gen, E = torch.Generator().manual_seed(0), 3
    stack = torch.nn.Parameter(torch.randn(E, m, n, dtype=torch.float64, generator=gen))
    matrix = torch.nn.Parameter(torch.randn(n, m, dtype=torch.float64, generator=gen))
    alone = [torch.nn.Parameter(t.detach().clone()) for t in (matrix, *stack)]
    before = stack.detach().clone()
    kw = dict(lr=0.05, weight_decay=0.1, adjust_lr_fn=adjust)
    ours, ref = common.ExpertMuon([matrix], [stack], **kw), torch.optim.Muon(alone, **kw)
    for _ in range(2):
        grads = (torch.randn(n, m, dtype=torch.float64, generator=gen),
                 torch.randn(E, m, n, dtype=torch.float64, generator=gen))
        matrix.grad, stack.grad = grads
        for p, g in zip(alone, (grads[0], *grads[1])):
            p.grad = g.clone()
        ours.step()
        ref.step()
    assert not torch.equal(stack, before)
    torch.testing.assert_close(matrix, alone[0], rtol=0, atol=1e-12)
    for e in range(E):
        torch.testing.assert_close(stack[e], alone[1 + e], rtol=0, atol=1e-12, msg=f"expert {e}")
        torch.testing.assert_close(ours.state[stack]["momentum_buffer"][e],
                                   ref.state[alone[1 + e]]["momentum_buffer"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="takes 2-D matrices and 3-D expert stacks, not a parameter of size"):
        common.ExpertMuon([matrix], [torch.nn.Parameter(torch.randn(4))])


def test_muon_steps_bf16_experts_as_torch_does_and_near_float64():
    """A bf16 [E, m, n] stack: ExpertMuon's in-place steps on the experts' views are bit for bit
    torch's Muon on E separate bf16 matrices (weights and momentum), and within bf16's precision of
    torch's Muon in float64. The bound: two bf16 roundings (unit 2^-8) of the weights a step (decay,
    then update), and 8 of the update's size lr_adj (|O| <= ~1): Newton-Schulz runs in bf16 in both
    (torch casts to bf16), from momentum kept in bf16 here and in float64 there. Over 100 seeds the
    error reached 0.57 of it, each expert's move at least 6.4 times it (so a stale expert fails)."""
    gen, E, m, n, steps = torch.Generator().manual_seed(0), 3, 8, 12, 2
    kw = dict(lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    lr_adj = 0.1 * 0.2 * math.sqrt(max(m, n))
    start = (0.1 * torch.randn(E, m, n, generator=gen)).bfloat16()
    stack = torch.nn.Parameter(start.clone())
    matrix = torch.nn.Parameter(torch.randn(m, n, generator=gen).bfloat16())
    alone = [torch.nn.Parameter(w.clone()) for w in start]
    wide = [torch.nn.Parameter(w.double()) for w in start]
    opts = common.ExpertMuon([matrix], [stack], **kw), torch.optim.Muon(alone, **kw), torch.optim.Muon(wide, **kw)
    for _ in range(steps):
        grad = torch.randn(E, m, n, generator=gen).bfloat16()
        stack.grad, matrix.grad = grad.clone(), torch.randn(m, n, generator=gen).bfloat16()
        for e in range(E):
            alone[e].grad, wide[e].grad = grad[e].clone(), grad[e].double()
        for opt in opts:
            opt.step()
    for e in range(E):
        assert torch.equal(stack[e], alone[e]), f"expert {e}"
        assert torch.equal(opts[0].state[stack]["momentum_buffer"][e], opts[1].state[alone[e]]["momentum_buffer"])
        top = max(start[e].double().abs().max().item(), wide[e].abs().max().item())
        bound = steps * 2**-8 * (2 * top + 8 * lr_adj)
        assert (stack[e].double() - wide[e]).abs().max().item() <= bound, f"expert {e}"
        assert (wide[e] - start[e].double()).abs().max().item() > 4 * bound  # the step is no rounding


MOE = dict(n_experts=4, experts_per_token=2, mlp="swiglu", mlp_hidden=24)


def test_muon_takes_an_moes_experts_and_router(tmp_path):
    """--optimizer muon on an MoE model: Muon's groups hold the blocks' matrices, the routers and
    the [E, m, n] expert stacks (momentum one [E, m, n] tensor each); biases, norms and embeddings
    stay AdamW's."""
    model = tiny_model(2, **MOE)
    opt = common.build_optimizer(model, 1e-2, 0.1, kind="muon")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    want = {f"trf_blocks.{i}.{m}" for i in range(TINY["n_layer"])
            for m in ("att.W_query.weight", "att.W_key.weight", "att.W_value.weight", "att.out_proj.weight",
                      "ff.router.weight", "ff.w_gate", "ff.w_up", "ff.w_down")}
    assert muon == want
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert adamw == set(names.values()) - want
    assert {"tok_emb.weight", "final_norm.weight", "trf_blocks.0.norm1.weight", "trf_blocks.0.att.W_query.bias"} <= adamw
    x, y = make_get_batch(synthetic_tokens(), 2)("train", torch.Generator().manual_seed(0))
    model(x, targets=y).backward()
    opt.step()
    stacks = {names[id(p)]: s["momentum_buffer"].shape for p, s in opt.muon.state.items() if p.dim() == 3}
    assert stacks == {n: dict(model.named_parameters())[n].shape for n in want if ".w_" in n}


def test_muon_on_experts_resumes_bitwise(tmp_path):
    """An MoE Muon run checkpointed at step 2 and resumed to 4 ends where an unbroken run does: the
    experts' [E, m, n] momenta are in the checkpoint and loaded back."""
    tokens = synthetic_tokens()

    def run(out, steps, **kw):
        t = Trainer(tiny_model(1, **MOE), args_for(out, max_steps=steps, ckpt_every=2, optimizer="muon", **kw),
                    loss_fn, make_get_batch(tokens, 2))
        t.fit()
        return t

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    saved = torch.load(tmp_path / "b" / "ckpt-0000002" / "state.pt", weights_only=False)["optimizer"]["muon"]
    assert sorted(tuple(s["momentum_buffer"].shape) for s in saved["state"].values() if s["momentum_buffer"].dim() == 3) \
        == sorted([(4, 24, TINY["n_embd"])] * 4 + [(4, TINY["n_embd"], 24)] * 2)
    resumed = run(tmp_path / "b", 4, resume="latest")
    for (n, p), q in zip(straight.raw_model.named_parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q), n
    # a checkpoint from when the experts were AdamW's: its groups do not fit, which is said by name
    model = tiny_model(1, **MOE)
    matrices, taken = common.block_matrices(model), {id(p) for p in common.block_matrices(model)}
    old = common.MuonWithAdamW(torch.optim.Muon(matrices, lr=1e-3), torch.optim.AdamW(
        [{**g, "params": [p for p in g["params"] if id(p) not in taken]} for g in common.param_groups(model, 0.1)]))
    with pytest.raises(UserError, match="gives the MoE's expert weights to AdamW, as --optimizer muon did before"):
        common.build_optimizer(model, 1e-3, kind="muon").load_state_dict(old.state_dict())


@pytest.mark.parametrize("change", ["hook_args", "step_skips_hook", "no_muon"])
def test_muon_on_experts_refuses_a_torch_whose_muon_it_cannot_hook(monkeypatch, change):
    """ExpertMuon overrides torch's private Muon._init_group: a torch whose Muon has another
    signature (or whose step no longer calls it) is refused by version when the optimizer is
    built, not with a bare TypeError or 'Param gradient must be a 2D matrix' inside the first
    step; a dense model's Muon, torch's own, does not depend on it. No Muon at all: by version too."""
    moe, dense = tiny_model(0, **MOE), tiny_model(0)
    if change == "no_muon":
        monkeypatch.delattr(torch.optim, "Muon")
        with pytest.raises(UserError, match=re.escape(f"needs torch.optim.Muon (torch 2.9 or later), this is torch {torch.__version__}")):
            common.build_optimizer(moe, 1e-3, kind="muon")
        return
    if change == "hook_args":
        def other_hook(self, group, params_with_grad, grads, muon_momentum_bufs, state_steps):
            return False
        monkeypatch.setattr(torch.optim.Muon, "_init_group", other_hook)
        found = "_init_group('self', 'group', 'params_with_grad', 'grads', 'muon_momentum_bufs', 'state_steps')"
    else:
        def other_step(self, closure=None):  # a step that collects its tensors itself
            return None
        monkeypatch.setattr(torch.optim.Muon, "step", other_step)
        found = "a step that does not call _init_group"
    with pytest.raises(UserError, match=re.escape(f"torch {torch.__version__}'s Muon has {found}: use a torch it fits, or --optimizer adamw")):
        common.build_optimizer(moe, 1e-3, kind="muon")
    assert type(common.build_optimizer(dense, 1e-3, kind="muon").muon) is torch.optim.Muon


def test_a_warmup_as_long_as_the_run_is_named(tmp_path, capsys):
    """The default --warmup-steps with a short --max-steps: the schedule never reaches --lr nor
    decays, which the loss curve alone does not show."""
    a = args_for(tmp_path, max_steps=3, warmup_steps=4, lr=1e-3, batch_size=2)
    Trainer(tiny_model(), a, loss_fn, make_get_batch(synthetic_tokens(), 2)).fit()
    assert "note: --warmup-steps 4 >= --max-steps 3: the learning rate stops at 7.50e-04 on the way up to " \
        "--lr 0.001 and never decays" in capsys.readouterr().err
    Trainer(tiny_model(), args_for(tmp_path / "b", max_steps=3, warmup_steps=2), loss_fn,
            make_get_batch(synthetic_tokens(), 4)).fit()
    assert "warmup" not in capsys.readouterr().err


def test_weight_decay_only_on_matrices(tmp_path):
    model = tiny_model()
    t = Trainer(model, args_for(tmp_path, weight_decay=0.1), loss_fn, make_get_batch(synthetic_tokens(), 2))
    decay, no_decay = t.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.95)  # nanoGPT's beta2, not AdamW's default 0.999
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed and all(n.endswith(".weight") and ("W_" in n or "out_proj" in n or ".fc" in n) for n in decayed)
    assert "tok_emb.weight" in kept and "pos_emb.weight" in kept  # the tied LM head is the embedding
    assert all(n.endswith("bias") or "norm" in n or "emb" in n for n in kept)
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decayed) + len(kept) == n_unique


def _first_step_grads(out, loss, get_batch, **kw):
    """(logged row, gradients the optimizer stepped with) of one Trainer step from tiny_model(0)."""
    t = Trainer(tiny_model(0), args_for(out, max_steps=1, warmup_steps=0, min_lr=3e-3, **kw), loss, get_batch)
    grads, step = [], t.optimizer.step

    def snapshot_then_step(*a, **k):
        grads.append(torch.cat([p.grad.flatten() for p in t.raw_model.parameters()]))
        return step(*a, **k)

    t.optimizer.step = snapshot_then_step
    t.fit()
    return rows(out)[0], grads[0]


@pytest.mark.parametrize("weighted", [False, True])
def test_grad_clip_scales_the_step_to_the_max_norm_and_logs_the_norm_before(tmp_path, weighted):
    """--grad-clip c: the optimizer steps with the gradient rescaled to norm c (when larger), and
    the log shows the norm before clipping; --grad-clip 0 leaves it alone. With (sum, count)
    losses the clip acts on the token-mean gradient, after the division by the count."""
    torch.manual_seed(3)
    x, y = torch.randint(0, VOCAB, (4, CTX)), torch.randint(1, VOCAB, (4, CTX))
    fn = weighted_loss_fn if weighted else loss_fn
    model = tiny_model(0)
    loss = fn(model, (x, y))
    (loss[0] / loss[1] if weighted else loss).backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    norm = float(want.norm())
    assert norm > 0.1, norm
    for clip in (0.0, 10 * norm, norm / 4):
        row, got = _first_step_grads(tmp_path / f"clip{clip}", fn, lambda s, g: (x, y), grad_clip=clip)
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-5), clip
        expect = want * min(1.0, clip / norm) if clip else want
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-7, msg=f"grad_clip {clip}")


# -- NaN stop and checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path, bad):
    calls = {"n": 0}

    def poisoned_loss(model, batch):
        calls["n"] += 1
        loss = loss_fn(model, batch)
        return loss * bad if calls["n"] == 5 else loss

    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=10, ckpt_every=2), poisoned_loss,
                make_get_batch(synthetic_tokens(), 2))
    with pytest.raises(UserError, match=rf"loss is {bad} at step 5\b") as err:
        t.fit()
    assert "ckpt-0000004" in str(err.value)
    assert [p.name for p in t.checkpointer.list()] == ["ckpt-0000002", "ckpt-0000004"]
    assert not list(tmp_path.glob(".tmp*"))
    state = common.load_state(tmp_path / "ckpt-0000004")
    assert state["step"] == 4
    saved = GPTModel.load(tmp_path / "ckpt-0000004" / "model.safetensors")
    for (n, p), q in zip(saved.named_parameters(), t.raw_model.parameters()):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q), f"{n}: the bad step must not update the weights"


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_nonfinite_gradient_under_a_finite_loss_stops_before_the_step(tmp_path, bad):
    """A loss whose value is fine but whose gradient is NaN (0 * d sqrt(x)/dx at x = 0) or inf
    (d sqrt(x)/dx at x = 0): the run stops at that step, naming the gradient norm, and the weights
    stay those of the step before."""
    calls = {"n": 0}

    def nan_grad_loss(model, batch):
        calls["n"] += 1
        loss = loss_fn(model, batch)
        if calls["n"] == 3:
            p = model.pos_emb.weight
            if bad == "nan":
                loss = loss + 0.0 * (p[0, 0] * 0.0).sqrt()  # value + 0; gradient 0 * inf = nan
            else:
                loss = loss + (p[0, 0] - p[0, 0].detach()).sqrt()  # value + 0; gradient 1 / (2 sqrt(0)) = inf
        return loss

    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=5, ckpt_every=2), nan_grad_loss,
                make_get_batch(synthetic_tokens(), 2))
    with pytest.raises(UserError, match=rf"gradient norm is {bad} at step 3;.*ckpt-0000002"):
        t.fit()
    saved = GPTModel.load(tmp_path / "ckpt-0000002" / "model.safetensors")
    for (n, p), q in zip(saved.named_parameters(), t.raw_model.parameters()):
        assert torch.equal(p, q), f"{n}: the step with a NaN gradient must not update the weights"


# -- fp16: dynamic loss scaling ---------------------------------------------------------------------------------
def _fixed_batch(seed=3, batch_size=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (batch_size, CTX + 1), generator=g)
    return lambda split, gen: (x[:, :-1], x[:, 1:])


def _overflow_at(steps):
    """loss_fn whose loss is 1e30 times larger at the given (1-based) steps: finite in fp32 (2^16 x
    1e30 < 3.4e38), but its gradient overflows fp16's 65504 in the first fp16 activation it meets."""
    calls = {"n": 0}

    def fn(model, batch):
        calls["n"] += 1
        loss = loss_fn(model, batch)
        return loss * 1e30 if calls["n"] in steps else loss

    return fn


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fp16_skips_a_step_whose_gradients_overflow_and_halves_the_scale(tmp_path, optimizer):
    """--dtype fp16: the loss is scaled by 2^16 for backward; a step whose gradients overflow
    leaves the weights and the optimizer's state alone (logged skipped, no gradient norm) and halves
    the scale. With a constant lr and one fixed batch, [overflow, step] ends on the weights of
    [step]. Muon + AdamW are skipped together (the scaler sees them as one optimizer)."""
    kw = dict(max_steps=2, warmup_steps=0, min_lr=3e-3, dtype="fp16", optimizer=optimizer)
    t = Trainer(tiny_model(), args_for(tmp_path / "skip", **kw), _overflow_at({1}), _fixed_batch())
    t.fit()
    r = [r for r in rows(tmp_path / "skip") if "loss" in r]
    assert [(x["loss_scale"], x["skipped"]) for x in r] == [(65536.0, True), (32768.0, False)]
    assert r[0]["grad_norm"] is None and math.isfinite(r[1]["grad_norm"]) and r[0]["loss"] > 1e29
    one = Trainer(tiny_model(), args_for(tmp_path / "one", **{**kw, "max_steps": 1}), loss_fn, _fixed_batch())
    one.fit()
    assert rows(tmp_path / "one")[0]["loss"] == pytest.approx(r[1]["loss"], rel=1e-6)
    for (n, p), q in zip(t.raw_model.named_parameters(), one.raw_model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-7), f"{n}: the skipped step moved the weights"
    # fp32 and bf16 take no scale: their rows say nothing of one
    b = Trainer(tiny_model(), args_for(tmp_path / "bf16", max_steps=1, dtype="bf16"), loss_fn, _fixed_batch())
    b.fit()
    assert "loss_scale" not in rows(tmp_path / "bf16")[0] and not b.scaler.enabled


def test_fp16_trains_like_fp32_and_resumes_its_scale(tmp_path):
    """fp16 autocast with loss scaling follows the fp32 run's losses to fp16's rounding; the scale
    is part of the checkpoint: a resume after an overflow goes on at the halved scale."""
    get = make_get_batch(synthetic_tokens(), 2)
    ref = Trainer(tiny_model(), args_for(tmp_path / "fp32", max_steps=12), loss_fn, get).fit()["losses"]
    half = Trainer(tiny_model(), args_for(tmp_path / "fp16", max_steps=12, dtype="fp16"), loss_fn, get).fit()["losses"]
    rel = max(abs(a - b) / a for a, b in zip(ref, half))
    print(f"fp32 {ref[0]:.4f} -> {ref[-1]:.4f}, fp16 {half[0]:.4f} -> {half[-1]:.4f}, max rel diff {rel:.2e}")
    assert 0 < rel < 1e-3, (ref, half)
    assert half[-1] < half[0] - 0.1  # it learned, so the agreement means something
    full = Trainer(tiny_model(), args_for(tmp_path / "full", max_steps=3, ckpt_every=2, dtype="fp16"),
                   _overflow_at({1}), get)
    full.fit()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "ckpt-0000002", resumed / "ckpt-0000002")
    Trainer(tiny_model(), args_for(resumed, max_steps=3, dtype="fp16", resume="latest"), loss_fn, get).fit()
    assert rows(resumed)[-1]["loss_scale"] == rows(tmp_path / "full")[-1]["loss_scale"] == 32768.0
    for p, q in zip(full.raw_model.parameters(), GPTModel.load(resumed / "ckpt-0000003" / "model.safetensors")
                    .parameters()):
        assert torch.equal(p, q)


def test_fp16_stops_when_the_gradients_overflow_at_a_scale_of_one(tmp_path):
    """Every step overflows: the scale halves from 2^16 once per skipped step, and the 17th step
    overflows at a scale of 1, where gradients overflow unscaled: the run diverged and stops."""
    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=40, dtype="fp16"), _overflow_at(range(1, 99)),
                _fixed_batch())
    with pytest.raises(UserError, match=r"gradient norm is (inf|nan) at step 17 with the fp16 loss scale already "
                                        r"at 1; stopped without saving"):
        t.fit()
    assert [r["loss_scale"] for r in rows(tmp_path)] == [2.0 ** (16 - i) for i in range(16)]


def test_auto_dtype_is_fp16_on_gpus_without_bf16(monkeypatch):
    """auto: bf16 on Ampere and later (compute capability 8.0+), fp16 before it (V100 7.0, T4 7.5:
    torch would emulate bf16 slowly and Triton has no bf16 dot there), fp32 on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, want in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                      ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: c)
        assert common.pick_dtype("auto", torch.device("cuda")) == want, cap
    assert common.pick_dtype("auto", torch.device("cpu")) == torch.float32
    # no GPU here: `bench` checks its --dtype name against "cuda" before it knows (bf16, the
    # benchmarks' dtype), and must not ask a driver that is not there

    def no_driver(d=None):
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_driver)
    assert common.pick_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_fp16_skips_a_step_whose_gradient_norm_is_inf_as_one_whose_norm_is_nan(tmp_path):
    """An overflow can leave inf in the gradients as well as NaN: the scaler skips either step while
    the scale is above 1. Here the first step's loss carries sqrt(w - w), 0 in value, whose
    gradient 1 / (2 sqrt(0)) is inf (the fp32 run stops on it: 'gradient norm is inf')."""
    calls = {"n": 0}

    def inf_grad_first(model, batch):
        calls["n"] += 1
        loss = loss_fn(model, batch)
        if calls["n"] == 1:
            w = model.pos_emb.weight[0, 0]
            loss = loss + (w - w.detach()).sqrt()
        return loss

    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=2, warmup_steps=0, min_lr=3e-3, dtype="fp16"),
                inf_grad_first, _fixed_batch())
    t.fit()
    r = [r for r in rows(tmp_path) if "loss" in r]
    assert [(x["loss_scale"], x["skipped"]) for x in r] == [(65536.0, True), (32768.0, False)]
    assert r[0]["grad_norm"] is None and math.isfinite(r[1]["grad_norm"])


def test_fp16_scales_a_token_weighted_loss_too(tmp_path):
    """(sum, count) losses under fp16: the summed loss's backward is scaled as a mean's is, so the
    unscaled gradient is the token mean's: its norm (logged) is the one fp32 autograd gives for
    sum / count at the same weights, to fp16 autocast's rounding (unscaled backward, divided by the
    scale, came out 2^16 times too small). The first step is taken (see the next test), from the
    initial weights."""
    g = torch.Generator().manual_seed(11)
    x, y = torch.randint(0, VOCAB, (4, CTX), generator=g), torch.randint(1, VOCAB, (4, CTX), generator=g)
    model = tiny_model(0)
    s, n = weighted_loss_fn(model, (x, y))
    (s / n).backward()
    want = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    t = Trainer(tiny_model(0), args_for(tmp_path, max_steps=1, dtype="fp16"), weighted_loss_fn,
                lambda split, gen: (x, y))
    t.fit()
    row, = rows(tmp_path)
    assert not row["skipped"]
    assert row["loss"] == pytest.approx(float(s.detach() / n), rel=1e-2)
    assert row["grad_norm"] == pytest.approx(want, rel=1e-2), (row["grad_norm"], want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fp16_stops_on_a_nonfinite_loss_rather_than_skipping_it(tmp_path, bad):
    """The scaler skips steps whose gradients overflow; a loss that is itself NaN or inf (in fp32,
    where the loss is computed) is no overflow of the scaling: the run stops, naming the loss."""
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = loss_fn(model, batch)
        return loss * bad if calls["n"] == 2 else loss

    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=3, dtype="fp16"), poisoned, _fixed_batch())
    with pytest.raises(UserError, match=rf"loss is {bad} at step 2; stopped without saving"):
        t.fit()
    assert [r["step"] for r in rows(tmp_path)] == [1]


def test_fp16_token_weighted_steps_are_not_skipped_for_the_count(tmp_path):
    """A (sum, count) loss's backward runs on the sum over the step's most countable targets, not
    on the bare sum, whose gradients are the count times a mean's: in fp16 they overflowed at the
    starting scale of 2^16 and the first steps (~log2 of the count) were skipped. Like a mean loss
    on the same batch, every step is taken at 2^16, with the same weights as an fp32 run to
    fp16's rounding: no further from it than twice the mean loss's fp16 run is from its fp32 run
    (that floor is the CPU's: ~9e-4 on one with AVX512-FP16, where a fixed 1e-3 failed; one
    skipped step is ~1.4e-2)."""
    g = torch.Generator().manual_seed(11)
    x, y = torch.randint(0, VOCAB, (8, CTX), generator=g), torch.randint(1, VOCAB, (8, CTX), generator=g)
    runs = {}
    for name, fn, dtype in (("mean", loss_fn, "fp16"), ("mean32", loss_fn, "fp32"), ("sum", weighted_loss_fn, "fp16"),
                            ("sum32", weighted_loss_fn, "fp32")):
        out = tmp_path / name
        t = Trainer(tiny_model(0), args_for(out, max_steps=4, batch_size=8, dtype=dtype), fn,
                    lambda split, gen: (x, y))
        t.fit()
        runs[name] = (rows(out), torch.cat([p.detach().flatten() for p in t.raw_model.parameters()]))
    for name in ("mean", "sum"):
        assert [(r["skipped"], r["loss_scale"]) for r in runs[name][0]] == [(False, 65536.0)] * 4, runs[name][0]
    def rel(a, b):
        return float((runs[a][1] - runs[b][1]).norm() / runs[b][1].norm())

    assert rel("sum", "sum32") < 2 * rel("mean", "mean32") < 4e-3


def test_token_weighted_backward_is_of_a_mean_size(tmp_path, monkeypatch):
    """What a (sum, count) micro-batch runs backward on: its sum over the first micro-batch's count
    times grad_accum, so the scaled gradients are a mean's size (neither count times larger, which
    overflowed fp16, nor far smaller, nearer fp16's underflow). With one micro-batch that is the
    token mean itself; the step's gradient is still the mean over every counted token."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, VOCAB, (6, CTX), generator=g), torch.randint(1, VOCAB, (6, CTX), generator=g)
    halves = [(x[:3], y[:3]), (x[3:], y[3:])]
    with torch.no_grad():
        sums = [weighted_loss_fn(tiny_model(0), b) for b in halves]
        whole = weighted_loss_fn(tiny_model(0), (x, y))
    for accum, batches in ((1, [(x, y)]), (2, halves)):
        t = Trainer(tiny_model(0), args_for(tmp_path / str(accum), max_steps=1, batch_size=6 // accum,
                                            grad_accum=accum), weighted_loss_fn, lambda split, gen: batches.pop(0))
        seen = []
        backward = t.scaler.backward
        monkeypatch.setattr(t.scaler, "backward", lambda loss: (seen.append(float(loss.detach())), backward(loss)))
        t.fit()
        if accum == 1:
            assert seen == [pytest.approx(float(whole[0]) / float(whole[1]), rel=1e-6)]
        else:
            first = float(sums[0][1]) * 2
            assert seen == [pytest.approx(float(s) / first, rel=1e-6) for s, _ in sums]


def test_fp16_log_line_of_a_skipped_step(tmp_path, capsys):
    """A skipped step's printed line says so where the gradient norm goes (it has none), and shows
    the scale it was taken at; the next line shows its norm and the halved scale."""
    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=2, dtype="fp16", log_every=1), _overflow_at({1}),
                _fixed_batch())
    t.fit()
    out = capsys.readouterr()
    lines = [l for l in (out.out + out.err).splitlines() if l.startswith("step ")]
    assert len(lines) == 2, lines
    assert "| grad_norm overflow, step skipped | loss scale 65536 |" in lines[0], lines[0]
    norm = rows(tmp_path)[1]["grad_norm"]
    assert f"| grad_norm {norm:.3f} | loss scale 32768 |" in lines[1], lines[1]


def test_a_resume_names_every_flag_that_changes_the_run_and_the_precision(tmp_path, capsys):
    """Each of TrainArgs' trajectory flags, the trainer's run_args and the precision changed on a
    resume: one note names each, now (and then); flags that change nothing computed go unnamed.
    A run resumed as it was started (here bf16) gets no note."""
    get = make_get_batch(synthetic_tokens(), 2)
    first = dict(max_steps=1, batch_size=4, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=2, weight_decay=0.1,
                 grad_clip=1.0, seed=7, keep_ckpts=3)
    Trainer(tiny_model(), args_for(tmp_path, **first), loss_fn, get, run_args={"beta": 0.1}).fit()
    capsys.readouterr()
    then = dict(max_steps=2, batch_size=3, grad_accum=2, lr=2e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.05,
                grad_clip=0.5, seed=8, keep_ckpts=2, dtype="fp16", resume="latest")
    Trainer(tiny_model(), args_for(tmp_path, **then), loss_fn, get, run_args={"beta": 0.5}).fit()
    err = capsys.readouterr().err
    assert ("note: resuming with --max-steps 2 (the run had 1), --batch-size 3 (4), --grad-accum 2 (1), "
            "--lr 0.002 (0.003), --min-lr 0.0001 (0.0003), --warmup-steps 1 (2), --weight-decay 0.05 (0.1), "
            "--grad-clip 0.5 (1.0), --seed 8 (7), --beta 0.5 (0.1), precision float16 (float32): the run goes "
            "on differently") in err, err
    assert "keep-ckpts" not in err
    same = dict(max_steps=1, dtype="bf16")
    Trainer(tiny_model(), args_for(tmp_path / "bf16", **same), loss_fn, get).fit()
    capsys.readouterr()
    Trainer(tiny_model(), args_for(tmp_path / "bf16", **{**same, "max_steps": 2}, resume="latest"), loss_fn, get).fit()
    err = capsys.readouterr().err
    assert "note: resuming with --max-steps 2 (the run had 1): the run goes on" in err, err
    assert "nothing to train" not in err  # a step short of --max-steps: that note is for a run already there


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB")])
def test_a_batch_that_does_not_fit_is_a_one_line_error(tmp_path, error):
    calls = {"n": 0}

    def hungry_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error
        return loss_fn(model, batch)

    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=5), hungry_loss, make_get_batch(synthetic_tokens(), 2))
    with pytest.raises(UserError, match=r"micro-batch of \(2, \d+\) tokens does not fit in cpu memory at step 3; "
                                        r"lower --batch-size") as err:
        t.fit()
    assert "\n" not in str(err.value) and "--activation-checkpointing" in str(err.value)
    # already on: not offered again
    calls["n"] = 0
    t = Trainer(tiny_model(), args_for(tmp_path / "ckpt", max_steps=5, activation_checkpointing=True), hungry_loss,
                make_get_batch(synthetic_tokens(), 2))
    with pytest.raises(UserError, match="lower --batch-size") as err:
        t.fit()
    assert "--activation-checkpointing" not in str(err.value)


def test_other_runtime_errors_are_not_disguised(tmp_path):
    def broken_loss(model, batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=2), broken_loss, make_get_batch(synthetic_tokens(), 2))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        t.fit()


def test_keep_last_k_and_a_crash_mid_save_leaves_no_half_checkpoint(tmp_path, monkeypatch, real_plots):
    a = args_for(tmp_path, max_steps=5, ckpt_every=1, keep_ckpts=2)
    t = Trainer(tiny_model(), a, loss_fn, make_get_batch(synthetic_tokens(), 2))
    t.fit()
    assert [p.name for p in t.checkpointer.list()] == ["ckpt-0000004", "ckpt-0000005"]
    for d in t.checkpointer.list():
        assert (d / "model.safetensors").is_file() and (d / "state.pt").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 1000

    # die while writing the step-7 checkpoint: no ckpt-0000007 appears, step 6's stays newest
    a2 = args_for(tmp_path, max_steps=7, ckpt_every=1, keep_ckpts=2, resume="latest")
    t2 = Trainer(tiny_model(), a2, loss_fn, make_get_batch(synthetic_tokens(), 2))
    real_save = torch.save

    def failing_save(obj, path, *args, **kw):
        if "0000007" in str(path):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        t2.fit()
    monkeypatch.undo()
    assert [p.name for p in t2.checkpointer.list()] == ["ckpt-0000005", "ckpt-0000006"]
    assert common.load_state(t2.checkpointer.latest())["step"] == 6


def test_checkpointer_keeps_one_and_saves_a_step_again(tmp_path):
    """keep=1 keeps the newest checkpoint alone (0 keeps all); saving a step that has a checkpoint
    (a run resumed from an earlier one) replaces it."""
    model, ck = tiny_model(), common.Checkpointer(tmp_path, keep=1)
    for i, step in enumerate((1, 2, 2)):
        ck.save(step, model, {"step": step, "save": i})
    assert [p.name for p in ck.list()] == ["ckpt-0000002"] and common.load_state(ck.latest())["save"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000002"]  # no temporary folder left


def test_the_last_step_is_always_checkpointed(tmp_path):
    """--ckpt-every that does not divide --max-steps, and a resumed run that saves nothing on the
    way: either way the run's last step ends up in a checkpoint, which fit() returns."""
    gb = make_get_batch(synthetic_tokens(), 2)
    out = Trainer(tiny_model(), args_for(tmp_path, max_steps=5, ckpt_every=2, keep_ckpts=0), loss_fn, gb).fit()
    assert [p.name for p in common.Checkpointer(tmp_path).list()] == ["ckpt-0000002", "ckpt-0000004", "ckpt-0000005"]
    assert Path(out["checkpoint"]).name == "ckpt-0000005"
    out = Trainer(tiny_model(), args_for(tmp_path, max_steps=7, ckpt_every=0, keep_ckpts=0, resume="latest"),
                  loss_fn, gb).fit()
    assert Path(out["checkpoint"]).name == "ckpt-0000007" and common.load_state(out["checkpoint"])["step"] == 7


@pytest.mark.parametrize("eval_every", [3, 0])
def test_the_last_step_is_always_evaluated_in_its_own_row(tmp_path, eval_every):
    """eval_every steps (and step 0) and, whatever eval_every, the last step: its row carries the
    evaluation and fit() returns that one, not an older one."""
    t = None

    def eval_fn(model):
        assert not model.training, "eval_fn must see the model in eval mode (no dropout)"
        return {"val_step": t.step}

    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=4, eval_every=eval_every), loss_fn,
                make_get_batch(synthetic_tokens(), 2), eval_fn=eval_fn)
    out = t.fit()
    logged = [(r["step"], r["val_step"]) for r in rows(tmp_path) if "val_step" in r]
    assert logged == ([(0, 0), (3, 3), (4, 4)] if eval_every else [(4, 4)])
    assert out["val_step"] == 4 and all("loss" in r for r in rows(tmp_path) if r["step"] == 4)


# -- arguments -----------------------------------------------------------------------------------------------
def test_add_train_args_defaults_and_namespace():
    from tritongpt.commands import add_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)  # also defines --kernels and --device: add_train_args must not clash
    add_train_args(p, out_dir="runs/x", max_steps=42, lr=1e-4)
    a = TrainArgs.from_namespace(p.parse_args([]))
    assert (a.out_dir, a.max_steps, a.lr, a.kernels, a.device, a.resume, a.compile) == \
        ("runs/x", 42, 1e-4, "auto", "auto", None, False)
    # a DDP process waits 1800 s for the others by default (Hugging Face's Trainer's; NCCL's own 600
    # was outlasted by rank 0's evaluations and checkpoints)
    assert (a.activation_checkpointing, a.ddp_timeout) == (False, 1800) and TrainArgs().ddp_timeout == 1800
    # the schedule: cosine, and wsd's decay over the last 20% (Hagele et al.'s cooldown), unless told
    assert (a.lr_schedule, a.decay_fraction) == ("cosine", 0.2)
    b = TrainArgs.from_namespace(p.parse_args(["--lr-schedule", "wsd", "--decay-fraction", "0.1"]))
    assert (b.lr_schedule, b.decay_fraction) == ("wsd", 0.1)
    with pytest.raises(SystemExit):  # argparse names the choices
        p.parse_args(["--lr-schedule", "cosin"])
    a = TrainArgs.from_namespace(p.parse_args(["--resume", "--grad-accum", "3", "--compile", "--dtype", "bf16",
                                               "--activation-checkpointing", "--ddp-timeout", "900"]))
    assert (a.resume, a.grad_accum, a.compile, a.dtype) == ("latest", 3, True, "bf16")
    assert (a.activation_checkpointing, a.ddp_timeout) == (True, 900)
    assert TrainArgs.from_namespace(p.parse_args(["--resume", "runs/old"])).resume == "runs/old"
    with pytest.raises(TypeError):
        add_train_args(argparse.ArgumentParser(), max_stepz=3)



def test_lm_loss_args_default_to_off_and_errors_name_the_flag():
    """--label-smoothing and --z-loss default to 0 (a run that names neither trains on the plain
    cross-entropy), parse as floats, and a bad value is a UserError naming the flag; a namespace
    without them (a trainer that does not add them) gets both off."""
    from tritongpt.train.loop import add_lm_loss_args, lm_loss_options

    p = argparse.ArgumentParser()
    add_lm_loss_args(p)
    a = p.parse_args([])
    assert (a.label_smoothing, a.z_loss) == (0.0, 0.0)
    assert lm_loss_options(a) == {"label_smoothing": 0.0, "z_loss": 0.0}
    assert lm_loss_options(argparse.Namespace()) == {"label_smoothing": 0.0, "z_loss": 0.0}
    assert lm_loss_options(p.parse_args(["--label-smoothing", "0.1", "--z-loss", "1e-4"])) == \
        {"label_smoothing": 0.1, "z_loss": 1e-4}
    with pytest.raises(UserError, match=r"^--z-loss must be in \[0, inf\], got -1.0$"):
        lm_loss_options(p.parse_args(["--z-loss=-1"]))
    with pytest.raises(UserError, match=r"^--label-smoothing must be a finite number, got inf$"):
        lm_loss_options(p.parse_args(["--label-smoothing", "inf"]))

@pytest.mark.parametrize("field,value,msg", [("batch_size", 0, "batch-size"), ("grad_accum", -1, "grad-accum"),
                                             ("max_steps", 0, "max-steps"), ("lr", 0.0, "--lr"),
                                             ("min_lr", 1.0, "min-lr"), ("dtype", "fp8", "dtype")])
def test_bad_train_args_are_user_errors(tmp_path, field, value, msg):
    with pytest.raises(UserError, match=msg):
        Trainer(tiny_model(), args_for(tmp_path, **{field: value}), loss_fn, make_get_batch(synthetic_tokens(), 2))


# -- throughput figures -------------------------------------------------------------------------------------
def test_mfu_pieces(monkeypatch):
    from tritongpt.train.loop import flops_per_token, peak_flops

    cfg = GPTConfig(**TINY)
    assert flops_per_token(cfg, 1000, 16) == 6 * 1000 + 12 * 2 * 2 * 16 * 16
    # a local layer's attention by its visible pairs: window 4 of 16 sees 16*4 - 4*4/2 = 56 of the causal 128
    local = GPTConfig(**TINY, attention_window=4, window_layers="odd")
    assert flops_per_token(local, 1000, 16) == 6 * 1000 + 12 * 2 * 16 * 16 + 12 * 2 * 16 * 16 * 56 / 128
    assert flops_per_token(local, 1000, 4) == flops_per_token(cfg, 1000, 4)  # the window holds the context
    assert peak_flops(torch.device("cpu")) is None  # CPU: MFU is reported as null
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H200", 989.5e12), ("NVIDIA H200 NVL", 835.5e12), ("NVIDIA L40", 181e12),
                       ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert peak_flops(torch.device("cuda")) == peak, name


# -- one loop, both paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_triton_path_tracks_reference_losses_through_the_loop(tmp_path, dtype, monkeypatch):
    """12 steps on each path from the same weights and batches; fp16 with loss scaling on both
    (the fused LM head then makes its gradients in backward, from the scaled upstream one)."""
    pytest.importorskip("tritongpt.kernels.attention")
    pytest.importorskip("tritongpt.kernels.mlp")
    pytest.importorskip("tritongpt.kernels.layernorm")
    tokens = synthetic_tokens()
    base = tiny_model(5, n_layer=1, n_head=1)  # head_dim 32; one layer: the interpreter is slow
    out, first_grads, batches = {}, {}, []
    steps = record_step_grads(monkeypatch)  # each step's unscaled, unclipped gradients: the first step's kept
    for path in ("reference", "triton"):
        a = args_for(tmp_path / path, max_steps=12, batch_size=2, kernels=path, lr=1e-2, min_lr=1e-3, dtype=dtype)
        t = Trainer(copy.deepcopy(base), a, loss_fn, make_get_batch(tokens, 2, record=batches))
        assert t.raw_model.kernels == (frozenset() if path == "reference" else set(KERNEL_NAMES))
        before = len(steps)
        out[path] = t.fit()["losses"]
        names = {p: n for n, p in t.raw_model.named_parameters()}
        first_grads[path] = {names[p]: g for p, g in steps[before]}
    # AdamW's step is nearly blind to a gradient's scale (a kernel's dq off by half moved the losses by 7e-5), so
    # the first step's gradients, from the same weights and batch, are held to float64's: each parameter's
    # (fp32 1e-4 relative, measured <= 6e-7; fp16 autocast 1e-2, measured <= 9e-4; that dq: 4e-4 and 0.5)
    assert all(map(torch.equal, batches[0], batches[12]))  # both paths' first step had the same batch
    want = copy.deepcopy(base).double()
    loss_fn(want, batches[0]).backward()
    assert_paths_grads_float64s({path: first_grads[path] for path in ("reference", "triton")}, want,
                                1e-4 if dtype == "fp32" else 1e-2)
    ref, tri = torch.tensor(out["reference"]), torch.tensor(out["triton"])
    rel = ((tri - ref).abs() / ref.abs()).max().item()
    print(f"12 steps, {dtype}: reference {ref[0]:.4f} -> {ref[-1]:.4f}, triton {tri[0]:.4f} -> {tri[-1]:.4f}, "
          f"max rel diff {rel:.2e}")
    assert ref[-1] < ref[0] - 0.2  # it learned something (0.31 in 12 steps), so the comparison means something
    assert rel < 1e-3


# -- DDP on CPU --------------------------------------------------------------------------------------------
def _as_torchrun_rank(rank, port):
    """The environment torchrun gives process `rank` of 2."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _ddp_worker(rank, out, rec, port, kw):
    """One of two DDP processes, set up the way torchrun would (env vars), then the plain Trainer."""
    _as_torchrun_rank(rank, port)
    seen, threads_in_step, seeds, timeouts = [], [], [], []
    loss = weighted_loss_fn if kw.pop("weighted", False) else loss_fn
    if kw.pop("unshared_muon", False):  # the reference: every rank steps every matrix itself
        build = common.build_optimizer
        common.build_optimizer = lambda *a, **k: build(*a, **{**k, "ranks": (0, 1)})  # this child only
    init = torch.distributed.init_process_group

    def init_recording_timeout(*a, **k):
        timeouts.append(k["timeout"].total_seconds() if "timeout" in k else None)
        return init(*a, **k)

    torch.distributed.init_process_group = init_recording_timeout  # in this child process only

    def loss_and_threads(model, batch):
        threads_in_step.append(_comm_threads())
        seeds.append(torch.initial_seed())  # the seed of the RNG dropout draws from
        return loss(model, batch)

    model = tiny_model(rank, **kw.pop("model", {}))
    t = Trainer(model, args_for(out, grad_accum=2, **kw),  # rank 0's init is broadcast
                loss_and_threads, make_get_batch(synthetic_tokens(), 2, record=seen))
    res = t.fit()
    params = torch.cat([p.detach().flatten() for p in t.raw_model.parameters()])
    muon = getattr(t.optimizer, "muon", None)
    names = {id(p): n for n, p in t.raw_model.named_parameters()}
    torch.save({"seen": seen, "params": params, "world": t.world_size, "ckpt": res["checkpoint"],
                "muon_state": None if muon is None else sorted(names[id(p)] for p in muon.state),
                "muon_owned": None if muon is None else sorted(names[id(p)] for p, r in
                                                               zip(t.optimizer.matrices, t.optimizer.owner) if r == rank),
                "group_left": torch.distributed.is_initialized(), "threads_in_step": threads_in_step[0],
                "threads_left": _comm_threads(), "seeds": seeds, "timeouts": timeouts},
               Path(rec) / f"rank{rank}.pt")


def _comm_threads():
    """Names of this process's gloo threads (Linux names its threads in /proc), or None elsewhere."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for t in tasks.iterdir():
        try:
            names.append((t / "comm").read_text().strip())
        except OSError:  # a thread that ended while we looked
            pass
    return sorted(n for n in names if "gloo" in n)


def _ddp_failing_worker(rank, out, rec, port, kw):
    """As _ddp_worker, but the loss raises inside the model's forward at the third call: the
    traceback's frames then hold the DDP wrapper, which must not keep the group alive."""
    _as_torchrun_rank(rank, port)
    calls = []

    def failing_loss(model, batch):
        calls.append(1)
        if len(calls) == 3:
            model.module.register_forward_pre_hook(lambda *_: 1 / 0)  # raise inside DDP's forward
        return loss_fn(model, batch)

    t = Trainer(tiny_model(rank), args_for(out, **kw), failing_loss, make_get_batch(synthetic_tokens(), 2))
    raised, threads = None, None
    try:
        t.fit()
    except ZeroDivisionError as e:
        # measured while the exception (and so its traceback) is alive, as it is when an error
        # reaches the top of a script: Python keeps it in sys.last_traceback into interpreter exit
        raised, threads = type(e).__name__, _comm_threads()
    torch.save({"raised": raised, "group_left": torch.distributed.is_initialized(),
                "threads_left": threads}, Path(rec) / f"rank{rank}.pt")


def _run_ddp(out, rec, worker=None, **kw):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec.mkdir(exist_ok=True)
    # fork: the children inherit the imported torch instead of paying for it again; but a pytest-xdist worker
    # whose earlier tests started autograd's device threads cannot run autograd in a forked child (torch refuses:
    # "Unable to handle autograd's threading in combination with fork-based multiprocessing"): spawned then, the
    # run folder put back as it was before the first attempt (which may have written a tracker's file or a log line
    # before its first backward failed)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    before = Path(rec) / "run-before"
    if Path(out).exists():
        shutil.copytree(out, before, dirs_exist_ok=True)
    try:
        mp.start_processes(worker or _ddp_worker, args=(str(out), str(rec), port, kw), nprocs=2, join=True,
                           start_method=method)
    except mp.ProcessRaisedException as e:
        if method != "fork" or "autograd's threading in combination with fork" not in str(e):
            raise
        shutil.rmtree(out, ignore_errors=True)
        if before.exists():
            shutil.copytree(before, out)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(worker or _ddp_worker, args=(str(out), str(rec), port, kw), nprocs=2, join=True,
                           start_method="spawn")
    return [torch.load(rec / f"rank{i}.pt") for i in (0, 1)]


def test_ddp_two_cpu_processes_gloo(tmp_path):
    out = tmp_path / "run"
    r0, r1 = _run_ddp(out, tmp_path / "rec", max_steps=4, ckpt_every=2)
    assert r0["world"] == r1["world"] == 2
    assert not r0["group_left"] and not r1["group_left"]  # the Trainer tore its process group down
    # ... and its threads with it: a group kept alive past destroy_process_group (by the DDP wrapper,
    # or by torch.distributed.nn.functional imported while it existed) keeps gloo threads running
    # into interpreter exit, where they made torchrun workers abort now and then
    for r in (r0, r1):
        if r["threads_in_step"] is not None:
            assert r["threads_in_step"], "no gloo threads seen while training: the probe is blind"
            assert r["threads_left"] == [], r["threads_left"]
    assert len(r0["seen"]) == len(r1["seen"]) == 8  # 4 steps x 2 micro-batches each
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(r0["seen"], r1["seen"]))  # data split by rank
    assert torch.equal(r0["params"], r1["params"])  # gradients were averaged: replicas agree
    # only rank 0 wrote: one row per step (not two), one set of checkpoints
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]
    assert r0["ckpt"] and r1["ckpt"] is None
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-0000002", "ckpt-0000004", "loss.png", "metrics.jsonl"]
    # the logged loss is the mean over both ranks: recompute step 1 from the initial weights
    model = tiny_model(0)
    with torch.no_grad():
        first = [loss_fn(model, b).item() for b in r0["seen"][:2] + r1["seen"][:2]]
    assert rows(out)[0]["step"] == 1 and rows(out)[0]["loss"] == pytest.approx(sum(first) / 4, rel=1e-5)
    # dropout masks differ by rank (seed + rank), or both ranks would drop the same units
    assert set(r0["seeds"]) == {7} and set(r1["seeds"]) == {8}, (r0["seeds"][:1], r1["seeds"][:1])
    # tok/s counts the global batch: 2 sequences x 2 micro-batches x 2 ranks of CTX tokens per step
    for r in rows(out):
        assert r["tok_per_s"] * r["dt"] == pytest.approx(2 * 2 * 2 * CTX, rel=1e-9), r

    # resume both ranks from step 2: each gets its own batch generator back; same end, bitwise
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "ckpt-0000002", resumed / "ckpt-0000002")
    q0, q1 = _run_ddp(resumed, tmp_path / "rec2", max_steps=4, ckpt_every=2, resume="latest")
    assert [torch.equal(a[0], b[0]) for a, b in zip(q0["seen"] + q1["seen"], r0["seen"][4:] + r1["seen"][4:])] \
        == [True] * 8
    assert torch.equal(q0["params"], r0["params"]) and torch.equal(q1["params"], r1["params"])


def test_shard_by_size_evens_the_loads_the_same_way_everywhere():
    # the largest first, to the least loaded: 10 -> 0, 7 -> 1, 4 -> 1 (7 < 10), 3 -> 0 (10 < 11), 3 -> 1 (11 < 13)
    assert common.shard_by_size([3, 10, 4, 7, 3], 2) == [0, 0, 1, 1, 1]
    assert common.shard_by_size([5, 5, 5], 1) == [0, 0, 0]
    assert common.shard_by_size([2, 1], 4) == [0, 1]  # ranks without a share are allowed
    sizes = [768 * 768] * 48 + [768 * 3072] * 24  # GPT-2 small's 72 block matrices over 8 ranks
    owner = common.shard_by_size(sizes, 8)
    loads = [sum(n for n, r in zip(sizes, owner) if r == k) for k in range(8)]
    assert max(loads) / min(loads) < 1.1 and sum(loads) == sum(sizes)


def test_ddp_muon_shares_its_work_and_checkpoints_the_whole_state(tmp_path):
    """--optimizer muon under DDP: each of the 2 ranks keeps momentum for (and orthogonalizes) only
    its own half of the block matrices, yet every rank ends with the weights of a run where each
    rank steps every matrix, bit for bit; the checkpoint holds every matrix's momentum, equal to that
    run's, and a resume from that run's checkpoint goes on exactly as both do."""
    shared = _run_ddp(tmp_path / "shared", tmp_path / "rec1", max_steps=4, ckpt_every=2, optimizer="muon")
    whole = _run_ddp(tmp_path / "whole", tmp_path / "rec2", max_steps=4, ckpt_every=2, optimizer="muon",
                     unshared_muon=True)
    matrices = sorted(f"trf_blocks.{i}.{m}.weight" for i in range(TINY["n_layer"])
                      for m in ("att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.fc1", "ff.fc2"))
    r0, r1 = shared
    assert r0["muon_state"] == r0["muon_owned"] and r1["muon_state"] == r1["muon_owned"]
    assert r0["muon_owned"] and r1["muon_owned"] and sorted(r0["muon_owned"] + r1["muon_owned"]) == matrices
    assert whole[0]["muon_state"] == whole[1]["muon_state"] == matrices  # unshared: each rank did all
    assert torch.equal(r0["params"], r1["params"])  # the gathered matrices reached both replicas
    assert torch.equal(r0["params"], whole[0]["params"])
    saved = [torch.load(d / "ckpt-0000004" / "state.pt", weights_only=False)["optimizer"]["muon"]
             for d in (tmp_path / "shared", tmp_path / "whole")]
    assert sorted(saved[0]["state"]) == sorted(saved[1]["state"]) == list(range(len(matrices)))
    for i in saved[1]["state"]:
        assert torch.equal(saved[0]["state"][i]["momentum_buffer"], saved[1]["state"][i]["momentum_buffer"]), i
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "ckpt-0000002", resumed / "ckpt-0000002")
    q0, q1 = _run_ddp(resumed, tmp_path / "rec3", max_steps=4, ckpt_every=2, optimizer="muon", resume="latest")
    assert q0["muon_state"] == q0["muon_owned"]  # the loaded state kept to this rank's share
    assert torch.equal(q0["params"], r0["params"]) and torch.equal(q1["params"], r0["params"])


def _ddp_shared_eval_worker(rank, out, rec, port, kw):
    """Two DDP processes with a rank-0 eval_fn and a shared_eval_fn that all-reduces."""
    _as_torchrun_rank(rank, port)
    calls = {"eval": [], "shared": []}
    t = None

    def eval_fn(model):
        calls["eval"].append(t.step)
        return {"val_loss": 1.5}

    def shared_eval_fn(model, r, world):
        calls["shared"].append((t.step, r, world, model.training, torch.is_grad_enabled()))
        total = torch.tensor([float(r + 1)])
        torch.distributed.all_reduce(total)  # a collective: it hangs unless every rank evaluates
        return {"shared_sum": total.item()}

    t = Trainer(tiny_model(rank), args_for(out, **kw), loss_fn, make_get_batch(synthetic_tokens(), 2),
                eval_fn=eval_fn, shared_eval_fn=shared_eval_fn)
    res = t.fit()
    torch.save({"calls": calls, "keys": sorted(k for k in res if k in ("val_loss", "shared_sum"))},
               Path(rec) / f"rank{rank}.pt")


def test_a_shared_evaluation_alone_runs_at_every_evaluation_and_at_a_resume_at_max_steps(tmp_path):
    """shared_eval_fn with no eval_fn (one process): the first step, every --eval-every, the last;
    a resume already at --max-steps evaluates its checkpoint, as eval_fn's runs do (under DDP a
    rank that skipped it would leave the others waiting in its all-reduce)."""
    calls, t = [], None

    def shared_eval_fn(model, rank, world):
        calls.append((t.step, rank, world, model.training))
        return {"shared_step": t.step}

    gb = make_get_batch(synthetic_tokens(), 2)
    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=3, eval_every=2), loss_fn, gb, shared_eval_fn=shared_eval_fn)
    assert t.fit()["shared_step"] == 3
    assert calls == [(s, 0, 1, False) for s in (0, 2, 3)]
    assert [(r["step"], r["shared_step"]) for r in rows(tmp_path) if "shared_step" in r] == [(0, 0), (2, 2), (3, 3)]
    t = Trainer(tiny_model(), args_for(tmp_path, max_steps=3, eval_every=2, resume="latest"), loss_fn, gb,
                shared_eval_fn=shared_eval_fn)
    assert t.fit()["shared_step"] == 3 and calls[3:] == [(3, 0, 1, False)]


def test_ddp_a_shared_evaluation_runs_on_every_rank_and_rank_0_logs_it(tmp_path):
    """shared_eval_fn runs on both ranks at the same steps (the first, every --eval-every, the
    last), in eval mode without grad; eval_fn on rank 0 only; rank 0 logs both results."""
    out = tmp_path / "run"
    r0, r1 = _run_ddp(out, tmp_path / "rec", worker=_ddp_shared_eval_worker, max_steps=5, eval_every=2,
                      ddp_timeout=120)
    assert r0["calls"]["eval"] == [0, 2, 4, 5] and r1["calls"]["eval"] == []
    for rank, r in enumerate((r0, r1)):
        assert r["calls"]["shared"] == [(s, rank, 2, False, False) for s in (0, 2, 4, 5)]
    evals = [r for r in rows(out) if "val_loss" in r]
    assert [(r["step"], r["val_loss"], r["shared_sum"]) for r in evals] == [(s, 1.5, 3.0) for s in (0, 2, 4, 5)]
    assert r0["keys"] == ["shared_sum", "val_loss"]  # fit's result: the last evaluation's keys
    assert r1["keys"] == ["shared_sum"]  # the other ranks return the shared result (logging nothing)


def test_ddp_token_weighted_loss_is_the_mean_over_both_ranks_tokens(tmp_path):
    """(sum, count) losses under DDP: the step is the token mean over all four micro-batches of both
    ranks, as one process taking the same four micro-batches computes it."""
    r0, r1 = _run_ddp(tmp_path / "run", tmp_path / "rec", max_steps=1, weighted=True, ddp_timeout=900)
    # --ddp-timeout reaches the process group (without it NCCL waits 600 s, gloo 1800)
    assert r0["timeouts"] == r1["timeouts"] == [900.0]
    batches = r0["seen"] + r1["seen"]
    with torch.no_grad():
        parts = [weighted_loss_fn(tiny_model(0), b) for b in batches]
    counts = [int(n) for _, n in parts]
    assert len(set(counts)) > 1, counts  # the ranks' micro-batches count different numbers of targets
    row = rows(tmp_path / "run")[0]
    assert row["loss"] == pytest.approx(sum(float(s) for s, _ in parts) / sum(counts), rel=1e-5)
    it = iter(batches)
    one = Trainer(tiny_model(0), args_for(tmp_path / "one", grad_accum=4, max_steps=1), weighted_loss_fn,
                  lambda s, g: next(it))
    one.fit()
    alone = rows(tmp_path / "one")[0]
    assert alone["loss"] == pytest.approx(row["loss"], rel=1e-5)
    assert alone["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-5)
    assert torch.allclose(r0["params"], torch.cat([p.detach().flatten() for p in one.raw_model.parameters()]),
                          rtol=1e-4, atol=1e-5)


def test_ddp_moe_aux_column_is_the_aux_in_the_loss_over_both_ranks(tmp_path):
    """A mixture of experts' (sum, count) loss under DDP: the moe_aux column is the aux each micro-batch added,
    weighed by its counted targets over both ranks' (all-reduced with the loss), so loss - moe_aux is the plain
    token mean; not rank 0's alone."""
    moe = dict(MOE, moe_aux_loss=0.7)
    r0, r1 = _run_ddp(tmp_path / "run", tmp_path / "rec", max_steps=1, weighted=True, model=moe)
    model = tiny_model(0, **moe)  # rank 0's weights, broadcast
    plain, aux, counts = [], [], []
    with torch.no_grad():
        for b in r0["seen"] + r1["seen"]:
            model.config.moe_aux_loss = 0.0
            s, n = weighted_loss_fn(model, b)
            plain.append(float(s)), counts.append(int(n)), aux.append(0.7 * model.router_aux_loss().item())
    row = rows(tmp_path / "run")[0]
    want = sum(a * n for a, n in zip(aux, counts)) / sum(counts)
    mine = sum(a * n for a, n in zip(aux[:2], counts[:2])) / sum(counts[:2])
    assert row["moe_aux"] == pytest.approx(want, rel=1e-5) and abs(mine - want) > 1e-6 * want
    assert row["loss"] - row["moe_aux"] == pytest.approx(sum(plain) / sum(counts), rel=1e-5)


def test_ddp_error_still_tears_the_group_down(tmp_path):
    r0, r1 = _run_ddp(tmp_path / "run", tmp_path / "rec", worker=_ddp_failing_worker, max_steps=4)
    for r in (r0, r1):
        assert r["raised"] == "ZeroDivisionError" and not r["group_left"]
        if r["threads_left"] is not None:
            assert r["threads_left"] == [], r["threads_left"]


# -- GPU: bf16 autocast, fused AdamW, Triton kernels, MFU, torch.compile -----------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# fp16 uncompiled only: the compiled runs are the GPU session's slowest tests, and the scaler is the same
@pytest.mark.parametrize("compile_,dtype", [(False, "bf16"), (True, "bf16"), (False, "fp16")])
def test_cuda_mixed_precision_triton_and_reference_agree_and_report_mfu(tmp_path, compile_, dtype):
    from tritongpt.train.loop import peak_flops

    tokens = synthetic_tokens(20000)
    base = tiny_model(5, n_embd=128, n_head=2, context_length=64)
    out = {}
    for path in ("reference", "triton"):
        a = args_for(tmp_path / path, max_steps=10, batch_size=8, kernels=path, device="cuda", dtype=dtype,
                     compile=compile_)
        t = Trainer(copy.deepcopy(base), a, loss_fn, make_get_batch(tokens, 8, block=64))
        assert t.optimizer.defaults.get("fused")  # fused AdamW on CUDA
        res = t.fit()
        out[path] = torch.tensor(res["losses"])
        r = rows(tmp_path / path)[-1]
        assert r["mem_gb"] > 0 and r.get("loss_scale") == (65536.0 if dtype == "fp16" else None)
        if peak_flops(t.device) is not None:
            assert 0 < r["mfu"] < 1
    ref, tri = out["reference"], out["triton"]
    assert torch.isfinite(tri).all() and tri[-1] < tri[0]
    rel = ((tri[:3] - ref[:3]).abs() / ref[:3]).max().item()
    assert rel < 1e-2, rel


def test_rng_state_of_a_machine_with_more_gpus_restores_on_fewer(monkeypatch):
    """Every process saves the RNG state of every GPU it sees: a checkpoint of a run on 8 GPUs,
    resumed on a machine with 1, handed torch 8 states for 1 device (IndexError: tuple index out
    of range in torch.cuda.set_rng_state_all). Those of the devices there are restored."""
    restored = []

    def set_rng_state_all(states):  # as torch's: device i for the i-th state
        for i, s in enumerate(states):
            if i >= torch.cuda.device_count():
                raise IndexError("tuple index out of range")
            restored.append(s)

    state = common.rng_state()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    common.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], state["cuda"][0])


def test_auto_device_under_torchrun_is_the_local_rank_gpu(monkeypatch):
    """Every command (the Trainer, and DPO's reference log-probs before it) picks the device
    with pick_device: under torchrun "auto" must be this rank's GPU, not cuda:0 for all."""
    from tritongpt.train.common import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="'cuda:2': this machine has 2 GPU"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device 'tpu'; use auto, cpu, cuda or cuda:N"):
        pick_device("tpu")


# -- common's helpers, one by one -------------------------------------------------------------------
def test_dtype_seed_and_oom_helpers_by_their_docs(monkeypatch, capsys):
    from types import SimpleNamespace

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert common.pick_dtype("auto", cpu) == torch.float32 and common.pick_dtype("auto", cuda) == torch.bfloat16
    for names, dtype in ((("fp32", "float32"), torch.float32), (("bf16", "bfloat16"), torch.bfloat16),
                         (("fp16", "float16"), torch.float16)):
        assert all(common.pick_dtype(n, cpu) == dtype for n in names), names
    with pytest.raises(UserError, match="unknown dtype 'fp64'; use auto, fp32, bf16 or fp16"):
        common.pick_dtype("fp64", cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"device 'cuda' requested but CUDA is not available: --device cpu \(or auto"):
        common.pick_device("cuda")
    # --seed: a 64-bit integer, both ends included
    for ok in (-2**63, 2**63 - 1, 0):
        common.check_seed(ok)
    for bad in (-2**63 - 1, 2**63):
        with pytest.raises(UserError, match="--seed must be a 64-bit integer"):
            common.check_seed(bad)
    # out of memory whatever the message says, when torch says so by the type
    from tritongpt.kernels._common import is_oom

    assert is_oom(torch.OutOfMemoryError("allocation failed")) and not is_oom(RuntimeError("shape"))
    # any Triton kernel on the CPU is interpreted: a comma list of them too, not only "triton"
    for kernels, noted in (("layernorm,mlp", True), ("triton", True), ("reference", False)):
        common.note_slow_kernels([SimpleNamespace(config=SimpleNamespace(kernels=kernels))], "cpu")
        assert ("Triton's interpreter" in capsys.readouterr().err) == noted, kernels


def test_run_folder_checks_and_clearing(tmp_path, monkeypatch):
    """check_out_dir: an empty metrics.jsonl is no run; a resume from a checkpoint inside out_dir
    continues the run there. clear_run also removes half-written checkpoints."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert common.check_out_dir(out, None, False) is False
    ck = out / "ckpt-0000002"
    ck.mkdir()
    (ck / "state.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="already holds a run"):
        common.check_out_dir(out, None, False)
    assert common.check_out_dir(out, str(ck), False) is False  # --resume run/ckpt-0000002 into run/
    assert common.check_out_dir(out, str(out), False) is False  # --resume run/ into run/
    # a checkpoint folder is its model.safetensors; a run folder, its newest checkpoint's
    (ck / "model.safetensors").write_bytes(b"")
    assert common.resolve_checkpoint(ck) == common.resolve_checkpoint(out) == ck / "model.safetensors"
    (out / ".tmp-ckpt-0000003-123").mkdir()
    common.clear_run(out)
    assert sorted(p.name for p in out.iterdir()) == []
    # a .safetensors file is itself the checkpoint
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"")
    assert common.resolve_checkpoint(f) == f
    assert common.data_path("") is None and common.data_path(None) is None  # the embedded data
    # a file named from another folder is the same data; a name that is no file (a dataset's) stays
    (tmp_path / "d.txt").write_text("x")
    monkeypatch.chdir(out)
    assert common.data_path("../d.txt") == common.data_path(tmp_path / "d.txt") == str((tmp_path / "d.txt").resolve())
    assert common.data_path("pydoc") == "pydoc"


def test_saved_model_config_is_empty_when_missing_or_unreadable(tmp_path):
    """saved_model_config (read on every resume, and for the error of a checkpoint of another
    size): the saved config as a dict, else {}, not an exception, for a file without one, with
    damaged JSON or JSON that is not an object, or that is no safetensors file at all."""
    import json

    from safetensors.torch import save_file

    n_layer = int(torch.randint(1, 9, ()))
    f = tmp_path / "m.safetensors"
    for meta, want in (({"config": json.dumps({"n_layer": n_layer})}, {"n_layer": n_layer}), (None, {}),
                       ({"config": "{not json"}, {}), ({"config": json.dumps([n_layer])}, {})):
        save_file({"w": torch.zeros(1)}, str(f), metadata=meta)
        assert common.saved_model_config(f) == want, meta
    # config_difference names the sizes that differ, not those equal, nor dropout or kernels (no shape)
    cfg = GPTConfig(**TINY)
    saved = {**cfg.to_dict(), "n_layer": n_layer + 2, "dropout": 0.5, "kernels": "triton"}
    save_file({"w": torch.zeros(1)}, str(f), metadata={"config": json.dumps(saved)})
    assert common.config_difference(f, cfg) == (f"the checkpoint's model has n_layer {n_layer + 2} (this run: 2); "
                                                "pass the --model (and --vocab-multiple) it was trained with")
    f.write_bytes(b"not safetensors")
    assert common.saved_model_config(f) == {} and common.config_difference(f, cfg) == ""


def test_check_resume_limit_precision_and_kernels_notes(tmp_path, capsys):
    """A checkpoint AT --max-steps is not past it; a state saved before precision was recorded
    (no "precision") gets no note and no error; no kernel note when the caller passes none."""
    state = {"step": 3, "args": {"lr": 0.1}, "kernels": "reference"}
    common.check_resume(tmp_path, state, {"max_steps": 3, "lr": 0.1}, ("lr",), "step", "--max-steps",
                        "torch.float32", say=True, kernels=None)
    assert capsys.readouterr().err == ""
    with pytest.raises(UserError, match="at step 3, past --max-steps 2"):
        common.check_resume(tmp_path, state, {"max_steps": 2, "lr": 0.1}, ("lr",), "step", "--max-steps",
                            "torch.float32", say=False)
    common.check_resume(tmp_path, {**state, "precision": "torch.bfloat16"}, {"max_steps": 3, "lr": 0.1}, ("lr",),
                        "step", "--max-steps", "torch.float32", say=True)
    assert "note: resuming with precision float32 (the run had bfloat16)" in capsys.readouterr().err
    # say=False (a DDP rank other than 0, an RLHF trainer made with log=False): no note of any kind
    common.check_resume(tmp_path, {**state, "precision": "torch.bfloat16"}, {"max_steps": 3, "lr": 0.2}, ("lr",),
                        "step", "--max-steps", "torch.float32", say=False, kernels="triton")
    assert capsys.readouterr().err == ""


def test_unrecorded_flags_name_only_what_changes_a_run_older_than_them():
    saved = {"lr": 0.1}  # a run from before the other flags were recorded
    names = ("lr", "clip", "mask", "mode", "n", "none", "alpha")
    now = {"lr": 0.2, "clip": 1.0, "mask": False, "mode": "sigmoid", "n": 0, "none": None, "alpha": 0.0}
    # lr is recorded (a change of it is check_resume's other note); the rest are at their default or off
    assert common.unrecorded_flags(saved, now, names, {"clip": 1.0, "mode": "sigmoid"}) == []
    now = {**now, "clip": 0.5, "mask": True, "mode": "hinge", "n": 3, "alpha": 0.25}
    assert common.unrecorded_flags(saved, now, names, {"clip": 1.0, "mode": "sigmoid"}) == [
        "--clip 0.5", "--mask True", "--mode hinge", "--n 3", "--alpha 0.25"]
    # a flag without a default is named when not off; one absent from the run's own args is not a flag of it
    assert common.unrecorded_flags(saved, {"mode": "sigmoid"}, ("mode",), {}) == ["--mode sigmoid"]
    assert common.unrecorded_flags(saved, {"other": 3}, ("mode",), {}) == []
    assert common.unrecorded_flags({}, now, names, {}) == []  # no record at all: nothing to compare


def test_check_resume_says_a_longer_wsd_run_is_extended_only_before_its_decay(tmp_path, capsys):
    """300 wsd steps decay from step 240, 600 from 480: a checkpoint at step 240 ran stable steps
    only, the same over 600 steps (the run is extended); at 242, steps 240 and 241 had decayed,
    so the run goes on differently, as it does with another flag changed too, or when the
    checkpoint's args do not hold the schedule's flags (a run from before them)."""
    was = dict(lr=1e-3, warmup_steps=10, max_steps=300, min_lr=1e-4, lr_schedule="wsd", decay_fraction=0.2)
    now = {**was, "max_steps": 600}
    names = ("max_steps", "lr", "min_lr", "lr_schedule", "decay_fraction", "warmup_steps")

    def note_for(step, saved=was, now_args=now):
        common.check_resume(tmp_path, {"step": step, "args": saved}, now_args, names, "step", "--max-steps",
                            "torch.float32", say=True)
        return capsys.readouterr().err

    assert note_for(240) == ("note: resuming with --max-steps 600 (the run had 300): up to step 240 the wsd schedule "
                             "gives the same learning rates over 600 steps, so the run goes on as if planned with "
                             "600 steps\n")
    differently = "note: resuming with --max-steps 600 (the run had 300): the run goes on differently"
    assert note_for(242).startswith(differently)
    assert "--max-steps 600 (the run had 300), --lr 0.002 (0.001): the run goes on differently" in \
        note_for(100, now_args={**now, "lr": 2e-3})
    assert note_for(100, saved={k: v for k, v in was.items() if k != "decay_fraction"}).startswith(differently)


def test_check_resume_says_extended_only_when_max_steps_alone_changed(tmp_path, capsys):
    """Before the decay a longer wsd run has the same rates so far, but with another flag that
    leaves the rates alone changed too (--batch-size), or another precision, the run does go on
    differently and the note names each change; a process that does not say (a DDP rank other
    than 0) notes nothing either way."""
    was = dict(lr=1e-3, warmup_steps=10, max_steps=300, min_lr=1e-4, lr_schedule="wsd", decay_fraction=0.2,
               batch_size=8)
    now = {**was, "max_steps": 600}
    names = ("max_steps", "batch_size", "lr", "min_lr", "lr_schedule", "decay_fraction", "warmup_steps")

    def note_for(now_args=now, precision="torch.float32", say=True):
        common.check_resume(tmp_path, {"step": 100, "args": was, "precision": "torch.float32"}, now_args, names,
                            "step", "--max-steps", precision, say=say)
        return capsys.readouterr().err

    assert note_for().endswith("so the run goes on as if planned with 600 steps\n")
    differently = ": the run goes on differently from the one it was started as\n"
    assert note_for(now_args={**now, "batch_size": 16}) == \
        "note: resuming with --max-steps 600 (the run had 300), --batch-size 16 (8)" + differently
    assert note_for(precision="torch.bfloat16") == \
        "note: resuming with --max-steps 600 (the run had 300), precision bfloat16 (float32)" + differently
    assert note_for(say=False) == ""


def test_load_state_mapped_reads_the_same_and_names_a_damaged_file_alike(tmp_path):
    """mmap=True (info, chat, eval read a field or two): the same dict; a file torch cannot map
    (cut short, empty, text, the pre-1.6 format) is read whole, so its error is the same."""
    from tritongpt.train.common import load_state

    state = {"step": 3, "prompt_format": "chat", "moments": torch.randn(50, 7)}
    torch.save(state, tmp_path / "state.pt")
    mapped = load_state(tmp_path, mmap=True)
    assert mapped["prompt_format"] == "chat" and torch.equal(mapped["moments"], state["moments"])
    good = (tmp_path / "state.pt").read_bytes()
    for content in (good[:1000], b"", b"some text\n"):
        (tmp_path / "state.pt").write_bytes(content)
        with pytest.raises(UserError) as whole:
            load_state(tmp_path)
        with pytest.raises(UserError) as mapped:
            load_state(tmp_path, mmap=True)
        assert str(mapped.value) == str(whole.value)
    torch.save(state, tmp_path / "state.pt", _use_new_zipfile_serialization=False)  # no zip: not mappable
    assert load_state(tmp_path, mmap=True)["step"] == 3
    torch.save([1], tmp_path / "state.pt")
    with pytest.raises(UserError, match="it holds a list"):
        load_state(tmp_path, mmap=True)


def test_a_resume_refuses_another_n_kv_head_by_name(tmp_path):
    """Fewer key/value heads change W_key's and W_value's shapes: the weights do not load, and the
    error names the field and the flag, not only torch's size mismatch."""
    gb = make_get_batch(synthetic_tokens(), 2)
    Trainer(tiny_model(n_kv_head=1), args_for(tmp_path, max_steps=1), loss_fn, gb).fit()
    with pytest.raises(UserError, match=r"does not fit this model: the checkpoint's model has n_kv_head 1 \(this "
                                        r"run: 0\); pass the --n-kv-head it was trained with$"):
        Trainer(tiny_model(), args_for(tmp_path, max_steps=1, resume="latest"), loss_fn, gb).fit()
    Trainer(tiny_model(n_kv_head=1), args_for(tmp_path, max_steps=2, resume="latest"), loss_fn, gb).fit()


def test_a_resume_refuses_another_attention_window(tmp_path):
    """A window (or other local layers) is another function of the same weights, as a cap is. Between
    two dense models window_layers means nothing and is not compared."""
    gb = make_get_batch(synthetic_tokens(), 2)
    Trainer(tiny_model(attention_window=3, window_layers="odd"), args_for(tmp_path, max_steps=1), loss_fn, gb).fit()

    def resume(out=tmp_path, **cfg):
        return Trainer(tiny_model(**cfg), args_for(out, max_steps=1, resume="latest"), loss_fn, gb).fit()

    with pytest.raises(UserError, match="model attends over the last 3 positions in odd layers, this run's model "
                                        "attends over the whole context: "
                                        "pass --attention-window 3 --window-layers odd$"):
        resume()
    with pytest.raises(UserError, match="odd layers, this run's model attends over the last 3 positions in all layers"):
        resume(attention_window=3)
    for window in (5, 2):  # a wider window, a narrower one
        with pytest.raises(UserError, match=f"odd layers, this run's model attends over the last {window} positions "
                                            "in odd layers"):
            resume(attention_window=window, window_layers="odd")
    resume(attention_window=3, window_layers="odd")
    dense = tmp_path / "dense"
    Trainer(tiny_model(), args_for(dense, max_steps=1), loss_fn, gb).fit()
    resume(dense, window_layers="odd")
    with pytest.raises(UserError, match="model attends over the whole context, this run's model attends over the "
                                        "last 2 positions in all layers: pass --attention-window 0$"):
        resume(dense, attention_window=2)
    # a saved config from before the fields is dense (and learns its positions: no RoPE); no saved
    # config at all is not compared
    resave_config(dense / "ckpt-0000001" / "model.safetensors",
                  without("attention_window", "window_layers", "position_encoding", "rope_theta"))
    resume(dense)
    with pytest.raises(UserError, match="model attends over the whole context, this run's model attends over the "
                                        "last 2 positions"):
        resume(dense, attention_window=2)
    resave_config(dense / "ckpt-0000001" / "model.safetensors", lambda config: None)
    resume(dense, attention_window=2)


def test_a_resume_refuses_unscaled_attention_scores_for_scaled_ones(tmp_path):
    """GPT-Neo's unscaled scores (scale_attention False) are another function of the same weights;
    a saved config from before the field scales them (GPT-2)."""
    gb = make_get_batch(synthetic_tokens(), 2)
    Trainer(tiny_model(scale_attention=False), args_for(tmp_path, max_steps=1), loss_fn, gb).fit()

    def resume(**cfg):
        return Trainer(tiny_model(**cfg), args_for(tmp_path, max_steps=1, resume="latest"), loss_fn, gb).fit()

    with pytest.raises(UserError, match=r"model does not scale its attention scores, this run's model scales its "
                                        r"attention scores by 1/sqrt\(head_dim\): pass the run's own --model$"):
        resume()
    resume(scale_attention=False)
    resave_config(tmp_path / "ckpt-0000001" / "model.safetensors", without("scale_attention"))
    resume()
    with pytest.raises(UserError, match="model scales its attention scores by 1/sqrt\\(head_dim\\), this run's model "
                                        "does not scale its attention scores"):
        resume(scale_attention=False)


def test_a_plot_with_none_of_its_keys_is_written_without_a_warning(tmp_path, real_plots):
    """A run whose metrics hold none of a plot's keys (kto on one class with no held-out examples: no margin, no
    accuracy) still writes the PNG, and matplotlib's "No artists with labels" warning is not printed to the user."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        common.plot_curves([{"step": 1, "loss": 0.5}], tmp_path / "margin.png", keys=("val_margin", "train_acc"))
        common.plot_curves([{"step": 1, "loss": 0.5}], tmp_path / "loss.png", keys=("loss",))
    assert (tmp_path / "margin.png").is_file() and (tmp_path / "loss.png").is_file()


def test_loss_png_is_drawn_once_for_each_set_of_rows(tmp_path, monkeypatch):
    """Each checkpoint draws loss.png with the rows so far; the end of the fit, whose rows its last checkpoint drew,
    draws nothing more (~0.2 s of matplotlib a plot); a plot deleted since is drawn again."""
    drawn, real = [], common.plot_curves
    monkeypatch.setattr(common, "plot_curves",
                        lambda rows, path, **kw: drawn.append([r["step"] for r in rows]) or real(rows, path, **kw))
    trainer = Trainer(tiny_model(), args_for(tmp_path, max_steps=4, ckpt_every=2), loss_fn,
                      make_get_batch(synthetic_tokens(), 2))
    trainer.fit()
    assert drawn == [[1, 2], [1, 2, 3, 4]]
    (tmp_path / "loss.png").unlink()
    trainer._plot()
    assert drawn == [[1, 2], [1, 2, 3, 4], [1, 2, 3, 4]] and (tmp_path / "loss.png").is_file()
