"""The preference trainers run the same first step on both kernel paths: DPO (sigmoid; reference-free ORPO, whose
loss holds the chosen answers' NLL, on a LoRA policy), KTO (on a QLoRA policy: an int4 base) and the reward model,
each through its own train_* for one step on the reference and Triton paths in fp32 and on the reference path in
float64, the first step's loss and every gradient the optimizer gets held to float64's. DPO's and KTO's log-probs
are the model's cross-entropy with reduction="none" (preference.model_token_logprobs), kernels/cross_entropy.py's
on the Triton path; the reward model scores the last hidden state. (PPO, GRPO and RLOO: test_rlhf's
test_an_updates_first_step_is_float64s_on_both_paths.)"""
import pytest
import torch

from parity import assert_close_rel, record_step_grads
from test_rlhf import CTX, WordTokenizer, compact_template
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.lora import add_lora
from tritongpt.model.quant import quantize
from tritongpt.model.toggle import KERNEL_NAMES
from tritongpt.train import common, dpo, kto, reward
from tritongpt.train.loop import TrainArgs, Trainer
from tritongpt.train.preference import task_preferences

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = "uppercase,lowercase"
PATHS = (("reference", torch.float64), ("reference", torch.float32), ("triton", torch.float32))


@pytest.fixture(scope="module")
def data():
    pairs = task_preferences(200, seed=0, template=compact_template, split="train", families=FAMILIES)
    return WordTokenizer([p.prompt + p.chosen + p.rejected for p in pairs]), pairs[:4]


def first_step(trainer, kernels, dtype, tok, pairs, out_dir, steps):
    """One step of `trainer`'s train_* on `kernels` in dtype, from seeded weights: (its first loss, {name: the
    gradient the optimizer got}, the model)."""
    config = GPTConfig(vocab_size=tok.vocab_size, context_length=CTX, n_embd=32, n_layer=1, n_head=1)
    torch.manual_seed(0)
    policy = GPTModel(config)
    torch.manual_seed(1)  # a reference other than the policy: DPO's and KTO's sigmoids away from 1/2
    ref = GPTModel(config).to(dtype)
    if trainer == "kto":  # on a QLoRA policy: its int4 base's kernel on the Triton path
        policy = quantize(policy, "int4", head=False, group_size=32)
    if trainer in ("orpo", "kto"):  # and ORPO's on a LoRA one; B starts at 0, which leaves A's gradient 0
        add_lora(policy, 4, 8.0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0.0, 0.1)
    args = TrainArgs(out_dir=str(out_dir), max_steps=1, batch_size=4, lr=1e-3, warmup_steps=0, eval_every=0,
                     ckpt_every=0, log_every=0, weight_decay=0.0, device="cpu", kernels=kernels, seed=0, dtype="fp32")
    if trainer == "reward":
        model = reward.RewardModel(policy).to(dtype)
        result = reward.train_reward_model(model, tok, pairs, [], args)
    elif trainer == "kto":
        model = policy.to(dtype)
        result = kto.train_kto(model, ref, tok, kto.unpair(pairs), [], args, beta=0.5)
    else:
        model = policy.to(dtype)
        result = dpo.train_dpo(model, ref, tok, pairs, [], args, beta=0.5, loss_type=trainer)
    names = {p: n for n, p in model.named_parameters()}
    return result["first_loss"], {names[p]: g for p, g in steps[-1]}, model


@pytest.mark.parametrize("trainer", ["sigmoid", "orpo", "kto", "reward"])
def test_a_preference_trainers_first_step_is_float64s_on_both_paths(data, trainer, tmp_path, monkeypatch):
    """fp32 on each path against float64: 1e-4 relative, tensor by tensor (measured <= 2.6e-5 on both paths, the
    reward model's: Bradley-Terry's gradient is the chosen and rejected scores' less each other's, and cancels).
    AdamW's steps are nearly blind to a gradient off by a common factor: the gradients, not the weights."""
    tok, pairs = data
    steps = record_step_grads(monkeypatch)
    # the end of the run's eval reads no gradient, and would take a third of the Triton path's interpreter time
    monkeypatch.setattr(Trainer, "_evaluates", lambda self: False)
    # nor do the runs' plots (two a run, ~0.2 s of matplotlib each: test_rlhf and test_kto draw these trainers')
    monkeypatch.setattr(common, "plot_curves", lambda *a, **k: None)
    runs = {}
    for kernels, dtype in PATHS:
        runs[kernels, dtype] = first_step(trainer, kernels, dtype, tok, pairs, tmp_path / f"{kernels}{dtype}", steps)
    assert len(steps) == len(PATHS)
    want_loss, want, _ = runs["reference", torch.float64]
    for (kernels, dtype), (loss, grads, model) in runs.items():
        assert getattr(model, "backbone", model).kernels == (frozenset(KERNEL_NAMES) if kernels == "triton" else
                                                             frozenset())
        assert grads.keys() == want.keys(), grads.keys()
        assert trainer not in ("orpo", "kto") or all("lora_" in n for n in grads), grads.keys()
        assert loss == pytest.approx(want_loss, rel=1e-6), (kernels, dtype)
        for name, g in grads.items():
            if want[name].abs().max() < 1e-6:  # 0 in exact arithmetic: W_key's bias (a shift its softmax ignores);
                assert g.abs().max() < 1e-6, (kernels, name, g.abs().max())  # the reward's biases after the last norm
            else:
                assert_close_rel(g, want[name], 1e-4, f"{kernels} {dtype} first step's {name}.grad")
