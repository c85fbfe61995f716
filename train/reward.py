"""Reward model: a GPT backbone plus one scalar head, trained on preference pairs.

    r(prompt, response) = head(final-normed hidden state at the last non-pad token)

The backbone starts from an SFT checkpoint, so it already reads the prompt format. The head
is a Linear(n_embd, 1). The last token of every sequence is the end-of-text token that
closes the response, so the score is read where the whole response has been seen.

Training minimizes the Bradley-Terry loss (Christiano et al. 2017; Ouyang et al. 2022):
    loss = -log sigmoid(r(chosen) - r(rejected))
i.e. the model's probability that the chosen response is preferred. The figure that matters
is the held-out pairwise accuracy: how often r(chosen) > r(rejected) on pairs never trained on.

The checkpoint is a safetensors file (backbone + head, config and kind="reward_model" in its
metadata) written by the shared Trainer; RewardModel.load reads it back for RLHF.
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tritongpt.errors import UserError, note
from tritongpt.train.tokenizer import TOKENIZER_CHOICES
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel, save_safetensors
from tritongpt.train.preference import encode_pairs, pair_batch
from tritongpt.cli import command_help

KIND = "reward_model"


class RewardModel(nn.Module):
    def __init__(self, backbone: GPTModel):
        super().__init__()
        self.backbone = backbone
        C = backbone.config.n_embd
        self.head = nn.Linear(C, 1)
        # unit-variance scores at the start (LayerNorm'd features, weights ~ 1/sqrt(C))
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(C + 1))
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> GPTConfig:
        return self.backbone.config

    def set_kernels(self, spec):
        self.backbone.set_kernels(spec)
        return self

    def forward(self, idx, lengths):
        """Scores [B] of right-padded sequences idx [B, T] with true lengths [B]."""
        if lengths.min() < 1 or lengths.max() > idx.size(1):
            raise UserError(f"lengths must be in [1, {idx.size(1)}], got {lengths.tolist()}")
        h = self.backbone.hidden(idx)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]
        return self.head(last).squeeze(-1).float()

    def save(self, path, extra_metadata: dict | None = None):
        meta = {"config": json.dumps(self.config.to_dict()), "format": "tritongpt", "kind": KIND}
        save_safetensors(self, path, {**meta, **(extra_metadata or {})})

    @classmethod
    def load(cls, path, map_location="cpu", kernels=None) -> "RewardModel":
        """A reward model from a .safetensors file, a checkpoint folder or a run folder."""
        from tritongpt.model.gpt import load_saved_weights, safetensors_metadata, saved_config
        from tritongpt.train.common import resolve_checkpoint

        path = resolve_checkpoint(path)
        meta = safetensors_metadata(path)
        if meta.get("kind") != KIND or "config" not in meta:
            raise UserError(f"{path} is not a reward model checkpoint (train one with `tritongpt reward`)")
        cfg = saved_config(path, meta)
        cfg.kernels = "reference"
        model = cls(GPTModel.empty(cfg))  # every tensor comes from the file
        load_saved_weights(model, path, map_location)
        if cfg.lora_rank:  # used, not trained on (RLHF scores with it): the merged backbone
            from tritongpt.model.lora import merge_lora

            merge_lora(model.backbone)
        model.to(map_location)
        if kernels is not None:
            model.set_kernels(kernels)
        return model


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_rewards(model, batch):
    """(r_chosen [B], r_rejected [B]) for a batch from preference.pair_batch."""
    idx, lengths = batch[0], batch[1]
    r = model(idx, lengths)
    return r.chunk(2)


def reward_loss_fn(model, batch):
    return bradley_terry_loss(*pair_rewards(model, batch))


@torch.no_grad()
def pairwise_metrics(model, encoded, pad_id: int, batch_size: int = 32) -> dict:
    """Accuracy (r_chosen > r_rejected), mean loss and mean margin over all given pairs."""
    device = next(model.parameters()).device
    correct, loss, margin, n = 0, 0.0, 0.0, 0
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        rc, rr = pair_rewards(model, pair_batch(chunk, pad_id, device))
        correct += (rc > rr).sum().item()
        loss += -F.logsigmoid(rc - rr).sum().item()
        margin += (rc - rr).sum().item()
        n += len(chunk)
    return {"acc": correct / n, "loss": loss / n, "margin": margin / n}


def make_get_batch(train, batch_size: int, pad_id: int):
    """get_batch(split, generator) for the Trainer (which draws training batches only):
    batch_size random pairs, chosen rows first."""
    def get_batch(split, generator):
        pick = torch.randint(len(train), (batch_size,), generator=generator).tolist()
        idx, lengths, _ = pair_batch([train[i] for i in pick], pad_id)
        return idx, lengths

    return get_batch


def train_reward_model(model: RewardModel, tokenizer, train_pairs, val_pairs, args, run_args: dict | None = None):
    """Fit with the shared Trainer; returns its final metrics dict (with val_acc, val_loss, val_margin).

    `args` is a loop.TrainArgs. Held-out pairwise accuracy is evaluated on every val pair at
    each eval and at the end (keys val_acc, val_loss, val_margin). run_args: the data flags, for
    the Trainer to name when a resume changes them.
    """
    from tritongpt.train.loop import Trainer

    ctx = model.config.context_length
    train = encode_pairs(train_pairs, tokenizer, ctx, "training pairs")
    val = encode_pairs(val_pairs, tokenizer, ctx, "held-out pairs") if val_pairs else []
    pad = tokenizer.eot_id

    def eval_fn(m):
        out = {}
        if val:
            v = pairwise_metrics(m, val, pad)
            out.update(val_loss=v["loss"], val_acc=v["acc"], val_margin=v["margin"])
        t = pairwise_metrics(m, train[:256], pad)
        out.update(train_acc=t["acc"])
        return out

    trainer = Trainer(model, args, reward_loss_fn, make_get_batch(train, args.batch_size, pad),
                      eval_fn=eval_fn, name="reward", run_args=run_args,
                      prompt_format=train_pairs[0].format if train_pairs else None)
    result = trainer.fit()
    if trainer.is_main:  # loss.png has the losses; accuracy gets its own plot
        from tritongpt.train.common import plot_curves

        plot_curves(trainer.metrics.rows(), trainer.out_dir / "accuracy.png", keys=("val_acc", "train_acc"),
                    title="reward model: pairwise accuracy")
    return result


# -- CLI ----------------------------------------------------------------------------------------
def build_backbone(args):
    """The reward/policy backbone: an SFT checkpoint (--init; anything `tritongpt sft --init` takes)
    or, for trying things out, a randomly initialised --model preset."""
    from tritongpt.commands import vocab_multiple
    from tritongpt.model.config import get_config

    multiple = vocab_multiple(args) if hasattr(args, "vocab_multiple") else None  # dpo and rlhf: an LM head
    if args.init:
        from tritongpt.train.sft import load_init_model

        # the --init model has its own size and vocabulary: these would be dropped without a word
        given = [f"--{k.replace('_', '-')} {v}" for k, v in (("model", args.model), ("vocab_size", args.vocab_size))
                 if v is not None]
        if given:
            raise UserError(f"{' and '.join(given)} with --init: the model is the --init checkpoint's, of its own "
                            "size and vocabulary; leave them out (they shape a fresh model, with no --init)")
        model = load_init_model(args.init)
        return model if multiple is None else model.pad_vocab(multiple)
    preset = args.model or "tiny"
    note(f"no --init checkpoint: the backbone is a randomly initialised {preset} "
         "(pass --init with an SFT run for a useful model)")
    return GPTModel(get_config(preset, vocab_size=args.vocab_size, vocab_multiple=multiple or 1))


def add_data_args(p):
    p.add_argument("--data", default=None,
                   help="preference pairs: JSON/JSONL file of {prompt|instruction[,input], chosen, rejected}, "
                        "or chats ({prompt: [messages], chosen: [answer], rejected: [answer]}, or chosen and "
                        "rejected message lists alike but for their last) (default: pairs built from the "
                        "embedded verifiable tasks)")
    from tritongpt.train.chat_template import add_chat_template_arg

    add_chat_template_arg(p)
    p.add_argument("--num-pairs", type=int, default=2000,
                   help="embedded training pairs (train split of the tasks) (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out pairs: this share of --num-pairs from the tasks' val split, or of a "
                        "--data file (default %(default)s)")
    p.add_argument("--init", default=None,
                   help="SFT checkpoint to start from: run folder, ckpt folder or .safetensors "
                        "(default: a random --model, for trying things out)")
    p.add_argument("--tokenizer", default=None,
                   help=TOKENIZER_CHOICES + " (default: the --init run's saved tokenizer, "
                        "else by vocab size)")
    p.add_argument("--vocab-size", type=int, default=None, help="with no --init: the fresh model's vocab")


def data_run_args(args) -> dict:
    """The data flags of `reward`, `dpo` and `rlhf` that a resume names when they change, and the
    --init the run started from (`export --adapter` puts a LoRA run's update on it)."""
    from tritongpt.train.common import data_path

    return {"data": data_path(args.data), "num_pairs": args.num_pairs, "val_fraction": args.val_fraction,
            "init": data_path(getattr(args, "init", None))}


def setup_preference_run(args, command: str):
    """What `reward` and `dpo` share: validated TrainArgs, the pairs (bad data fails before any
    slow work), the backbone from --init, and its tokenizer (saved beside the run)."""
    from tritongpt.train.chat import note_template_mismatch
    from tritongpt.train.chat_template import chat_template_for
    from tritongpt.train.common import check_out_dir, set_seed
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.preference import train_val_pairs
    from tritongpt.train.sft import pick_tokenizer
    from tritongpt.train.tokenizer import save_run_tokenizer

    set_seed(args.seed)
    targs = TrainArgs.from_namespace(args)
    targs.validate()
    check_out_dir(targs.out_dir, targs.resume, targs.overwrite)  # before the tokenizer is written there
    train, val = train_val_pairs(args.data, args.num_pairs, args.val_fraction, args.seed)
    note_template_mismatch([p.format for p in train + val], {"--init": args.init})
    backbone = build_backbone(args)
    tok = pick_tokenizer(args.tokenizer, args.init, backbone.config.vocab_size)
    tok = chat_template_for(tok, command, args.chat_template, any(p.format == "chat" for p in train + val))
    save_run_tokenizer(tok, args.out_dir)
    return targs, train, val, backbone, tok


def cmd_reward(args):
    from tritongpt.commands import apply_lora
    from tritongpt.model.lora import check_lora

    check_lora(args.lora_rank, args.lora_alpha, args.lora_targets)  # before the slow set-up
    targs, train, val, backbone, tok = setup_preference_run(args, "reward")
    model = RewardModel(apply_lora(backbone, args, "reward head"))  # the scalar head is new: it trains whole
    result = train_reward_model(model, tok, train, val, targs, run_args=data_run_args(args))
    if not result["is_main"]:  # DDP: rank 0 reports
        return 0
    acc = result.get("val_acc")
    measured = "no held-out pairs to measure (--val-fraction)" if acc is None else \
        f"held-out pairwise accuracy {acc:.3f}"
    print(f"reward model: {len(train)} training pairs, {len(val)} held out; {measured}; "
          f"checkpoint {result['checkpoint']}")
    return 0


def add_cli(sub):
    from tritongpt.commands import add_lora_args, add_model_args
    from tritongpt.train.loop import add_train_args

    p = sub.add_parser("reward", help=command_help("reward"))
    add_model_args(p, default_model=None, default_text="tiny, with no --init")
    add_data_args(p)
    add_lora_args(p)
    add_train_args(p, out_dir="runs/reward", max_steps=300, batch_size=16, lr=1e-4, min_lr=1e-5,
                   warmup_steps=20, eval_every=50, ckpt_every=100, sample_every=0, weight_decay=0.0)
    p.set_defaults(func=cmd_reward)
