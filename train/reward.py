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

QLoRA (--lora-rank with --quantize int8|int4): the backbone's block matrices are quantized and frozen, LoRA
updates train beside them and the scalar head trains whole in float; the file says how the backbone is quantized
(GPTModel's metadata keys), and the model is used unmerged (rlhf --reward, eval), exported merged.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tritongpt.errors import UserError, note
from tritongpt.train.tokenizer import TOKENIZER_CHOICES, bytes_to_unicode
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel, save_safetensors
from tritongpt.train import common
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

    @property
    def quantized(self):
        """The backbone's quantization (QLoRA's: reward --quantize), None for a float one: what the Trainer's
        resume and export ask a model."""
        return getattr(self.backbone, "quantized", None)

    @property
    def quantized_group_size(self):
        return getattr(self.backbone, "quantized_group_size", None)

    @property
    def base_folder(self):
        """The GPTQ or AWQ folder whose own quantization the backbone is (sft.load_init_base), None otherwise: what
        the Trainer's resume re-loads and compares with the checkpoint's base (common.check_same_base)."""
        return getattr(self.backbone, "base_folder", None)

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
        meta = {"config": json.dumps(self.config.to_dict()), "format": "tritongpt", "kind": KIND,
                **self.backbone.quantized_metadata()}  # a QLoRA backbone's int8/int4 matrices, as GPTModel saves them
        save_safetensors(self, path, {**meta, **(extra_metadata or {})})

    @classmethod
    def load(cls, path, map_location="cpu", kernels=None, quantized_ok: bool = False) -> "RewardModel":
        """A reward model from a .safetensors file, a checkpoint folder or a run folder, or a Hugging Face
        <Family>ForSequenceClassification folder (what `export` writes of one, or TRL's RewardTrainer saves).

        A LoRA one comes merged; a QLoRA one (reward --quantize) only where quantized_ok (the commands that use it:
        rlhf --reward, eval, info, export), with its updates beside the quantized matrices, unmerged (merged, its
        backbone would be a float model again), as load_checkpoint keeps a QLoRA language model; elsewhere (a
        trainer's --init, merge) it is refused by name."""
        from tritongpt.model.gpt import check_quantized_scales, load_saved_weights, safetensors_metadata, saved_config
        from tritongpt.train.common import resolve_checkpoint
        from tritongpt.train.gpt2_weights import is_hf_weights

        if not isinstance(quantized_ok, bool):  # ("no" is truthy: it would let a QLoRA file in)
            raise UserError(f"quantized_ok must be True or False, got {quantized_ok!r}")
        path = resolve_checkpoint(path)
        ours = str(path).endswith(".safetensors") and safetensors_metadata(path).get("format") == "tritongpt"
        if not ours and is_hf_weights(path):
            model = cls.from_hugging_face(path)
        else:
            meta = safetensors_metadata(path)
            if meta.get("kind") != KIND or "config" not in meta:
                raise UserError(f"{path} is not a reward model checkpoint (train one with `tritongpt reward`)")
            cfg = saved_config(path, meta)
            cfg.kernels = "reference"
            quantized = meta.get("quantized")
            if quantized and not quantized_ok:
                what = (f"a QLoRA reward model (LoRA updates on an {quantized} backbone)" if cfg.lora_rank else
                        f"a reward model on an {quantized} backbone")
                raise UserError(f"{path} is {what}: rlhf --reward, eval and info use it, "
                                "`tritongpt export` writes it merged (the backbone dequantized); to train on, resume "
                                "its run (reward --resume) or start from the float model it was made from")
            # every tensor comes from the file; a quantized backbone's layout as GPTModel.load builds it
            model = cls(GPTModel._empty_quantized(cfg, path, meta, True) if quantized else GPTModel.empty(cfg))
            load_saved_weights(model, path, map_location)
            if quantized:
                check_quantized_scales(model, path)
            elif cfg.lora_rank:  # used, not trained on (RLHF scores with it): the merged backbone
                from tritongpt.model.lora import merge_lora

                merge_lora(model.backbone)
        model.to(map_location)
        if kernels is not None:
            model.set_kernels(kernels)
        return model

    @classmethod
    def from_hugging_face(cls, path) -> "RewardModel":
        """A Hugging Face <Family>ForSequenceClassification's weights file with one label: its backbone read by the
        family's own reader (gpt2_weights.load_checkpoint), its `score` (no bias) our head. transformers reads the
        score at the last token that is not the pad; ours at `lengths - 1`: the same token on right-padded rows."""
        from tritongpt.model.gpt import check_finite_weights
        from tritongpt.train.gpt2_weights import SCORE, classifier_name, load_checkpoint, reading_classifier

        name = classifier_name(path)
        if name is None:
            raise UserError(f"{path} is a Hugging Face model with no sequence classifier's score head, not a reward "
                            "model (a <Family>ForSequenceClassification with one label; or train one with "
                            "`tritongpt reward`)")
        if name.endswith("ForTokenClassification"):
            raise UserError(f"{path} is a {name}: a score for every token, not one for a sequence; a reward model is "
                            "a <Family>ForSequenceClassification with one label")
        with reading_classifier() as held:
            # quantized_ok: what the folder loads as decides, not its config alone (a GPTQ folder whose groups no int4
            # group size divides, a bitsandbytes 8-bit one with a linear left float, load as float models)
            backbone = load_checkpoint(path, quantized_ok=True)
        if getattr(backbone, "quantized", None):
            refuse_quantized_classifier(path, name)
        score, C = held[SCORE], backbone.config.n_embd
        if score.shape != (1, C):
            raise UserError(f"{path}: {SCORE} has shape {tuple(score.shape)}; a reward model's is (1, {C}): one "
                            f"label, one score per sequence ({name.removeprefix('a ')}: {score.shape[0]} labels)")
        model = cls(backbone)
        with torch.no_grad():
            model.head.weight.copy_(score)
            model.head.bias.zero_()  # transformers' score has none
        check_finite_weights(model.head, path)
        return model


def refuse_quantized_classifier(path, name: str) -> None:
    """A GPTQ or AWQ classifier folder kept quantized (it loaded so: RewardModel.from_hugging_face) is not read as a
    reward model (rlhf --reward, eval, reward's --init): the loader's refusal would speak of a causal LM's uses. Said
    here, naming what does take the folder's quantization: `reward --init` on a GPTQ or AWQ causal LM with --lora-rank
    (sft.load_init_base), whose QLoRA reward model rlhf --reward runs unmerged."""
    from tritongpt.train.gpt2_weights import hf_quantization
    from tritongpt.train.hf_quant import folder_quantization

    cfg = Path(path).parent / "config.json"
    spec = folder_quantization(cfg)[0]
    if spec is not None:
        raise UserError(f"{path} is a {spec['method'].upper()}-quantized {name.removeprefix('a ')} "
                        f"({hf_quantization(cfg)['_where']}): a reward model here is read from float weights; use the "
                        "float classifier it was quantized from, or train a QLoRA reward model on a GPTQ or AWQ causal "
                        "LM folder (reward --init FOLDER --lora-rank R)")


def bradley_terry_loss(r_chosen, r_rejected, margin=None):
    """-log sigmoid(r_chosen - r_rejected), averaged over pairs; with each pair's margin [B] (Llama 2's: how much
    better chosen is, from its raters' scale), -log sigmoid(r_chosen - r_rejected - margin), as TRL's
    RewardTrainer takes a `margin` column: a pair rated far apart must be scored far apart."""
    if margin is not None:
        r_rejected = r_rejected + margin
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def centering_loss(r_chosen, r_rejected):
    """mean((r_chosen + r_rejected)^2), TRL's center_rewards_coefficient term (Eisenstein et al. 2023): Bradley-Terry
    sees only differences, so the scores may drift as a whole; this pulls their mean toward 0, which makes scores
    of different runs (and PPO's rewards, unnormalized) comparable."""
    return ((r_chosen + r_rejected) ** 2).mean()


def pair_rewards(model, batch):
    """(r_chosen [B], r_rejected [B]) for a batch from preference.pair_batch."""
    idx, lengths = batch[0], batch[1]
    r = model(idx, lengths)
    return r.chunk(2)


def make_reward_loss(center_rewards_coefficient: float = 0.0):
    """The training loss of a batch (idx, lengths, margins [B] or None): Bradley-Terry, plus the centering term."""
    def loss_fn(model, batch):
        rc, rr = pair_rewards(model, batch)
        loss = bradley_terry_loss(rc, rr, batch[2])
        if center_rewards_coefficient:
            loss = loss + center_rewards_coefficient * centering_loss(rc, rr)
        # a mixture-of-experts backbone's load-balancing loss over the pairs' one forward: its routers train here
        # too, and without it nothing keeps their load even
        aux = common.moe_aux_term(model, common.length_mask(batch[1], batch[0].size(1)))  # pads left out
        return loss if aux is None else loss + aux

    return loss_fn


def pair_margins(encoded, device="cpu"):
    """The pairs' margins [B], or None where none has one (the plain Bradley-Terry loss)."""
    if not any(e.margin for e in encoded):
        return None
    return torch.tensor([e.margin for e in encoded], dtype=torch.float32, device=device)


@torch.no_grad()
def pairwise_metrics(model, encoded, pad_id: int, batch_size: int = 32) -> dict:
    """Accuracy (r_chosen > r_rejected), mean Bradley-Terry loss (with the pairs' own margins, where they have
    them), mean margin r_chosen - r_rejected and mean score (r_chosen + r_rejected) / 2 over all given pairs."""
    device = next(model.parameters()).device
    correct, loss, margin, score, n = 0, 0.0, 0.0, 0.0, 0
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        rc, rr = pair_rewards(model, pair_batch(chunk, pad_id, device))
        correct += (rc > rr).sum().item()
        loss += bradley_terry_loss(rc, rr, pair_margins(chunk, device)).item() * len(chunk)
        margin += (rc - rr).sum().item()
        score += (rc + rr).sum().item() / 2
        n += len(chunk)
    return {"acc": correct / n, "loss": loss / n, "margin": margin / n, "score": score / n}


def make_get_batch(train, batch_size: int, pad_id: int):
    """get_batch(split, generator) for the Trainer (which draws training batches only):
    batch_size random pairs, chosen rows first."""
    def get_batch(split, generator):
        pick = torch.randint(len(train), (batch_size,), generator=generator).tolist()
        chosen = [train[i] for i in pick]
        idx, lengths, _ = pair_batch(chosen, pad_id)
        return idx, lengths, pair_margins(chosen)

    return get_batch


def train_reward_model(model: RewardModel, tokenizer, train_pairs, val_pairs, args, run_args: dict | None = None,
                       center_rewards_coefficient: float = 0.0):
    """Fit with the shared Trainer; returns its final metrics dict (with val_acc, val_loss, val_margin).

    `args` is a loop.TrainArgs. Held-out pairwise accuracy is evaluated on every val pair at
    each eval and at the end (keys val_acc, val_loss, val_margin, val_score). run_args: the data flags, for
    the Trainer to name when a resume changes them. center_rewards_coefficient: TRL's, the weight of
    centering_loss in the training loss (0: none).
    """
    from tritongpt.train.loop import Trainer

    check_center_coefficient(center_rewards_coefficient)

    ctx = model.config.context_length
    train = encode_pairs(train_pairs, tokenizer, ctx, "training pairs")
    val = encode_pairs(val_pairs, tokenizer, ctx, "held-out pairs") if val_pairs else []
    pad = tokenizer.eot_id

    def eval_fn(m):
        out = {}
        if val:
            v = pairwise_metrics(m, val, pad)
            out.update(val_loss=v["loss"], val_acc=v["acc"], val_margin=v["margin"], val_score=v["score"])
        t = pairwise_metrics(m, train[:256], pad)
        out.update(train_acc=t["acc"])
        return out

    # recorded when 0 too: a resume that drops it is named (a run from before the flag has no record: not compared)
    run_args = {**(run_args or {}), "center_rewards_coefficient": center_rewards_coefficient}
    trainer = Trainer(model, args, make_reward_loss(center_rewards_coefficient),
                      make_get_batch(train, args.batch_size, pad), eval_fn=eval_fn, name="reward", run_args=run_args,
                      prompt_format=train_pairs[0].format if train_pairs else None, run_defaults=DATA_DEFAULTS)
    result = trainer.fit()
    if trainer.is_main:  # loss.png has the losses; accuracy gets its own plot
        from tritongpt.train.common import plot_curves

        plot_curves(trainer.metrics.rows(), trainer.out_dir / "accuracy.png", keys=("val_acc", "train_acc"),
                    title="reward model: pairwise accuracy")
    return result


# -- CLI ----------------------------------------------------------------------------------------
def check_center_coefficient(c):
    if not 0 <= c < math.inf:
        raise UserError(f"--center-rewards-coefficient must be a finite number >= 0 (0: none; TRL's examples use "
                        f"0.01), got {c}")


def refuse_fresh_model_flags(args):
    """The --init model has its own size and vocabulary: --model and --vocab-size would be dropped without a word."""
    given = [f"--{k.replace('_', '-')} {v}" for k, v in (("model", args.model), ("vocab_size", args.vocab_size))
             if v is not None]
    if given:
        raise UserError(f"{' and '.join(given)} with --init: the model is the --init checkpoint's, of its own "
                        "size and vocabulary; leave them out (they shape a fresh model, with no --init)")


def is_reward_model(path) -> bool:
    """Whether path holds what RewardModel.load reads: a `tritongpt reward` checkpoint (file, checkpoint or run
    folder) or a Hugging Face sequence classifier."""
    from tritongpt.train.common import resolve_checkpoint
    from tritongpt.train.gpt2_weights import classifier_name, is_hf_weights

    if not path or not Path(path).expanduser().exists():
        return False
    try:
        file = resolve_checkpoint(Path(path).expanduser())
    except UserError:  # no checkpoint there: the --init reader says so
        return False
    return classifier_name(file) is not None if is_hf_weights(file) else is_reward_checkpoint(file)


def build_backbone(args):
    """The reward/policy backbone: an SFT checkpoint (--init; anything `tritongpt sft --init` takes)
    or, for trying things out, a randomly initialised --model preset."""
    from tritongpt.commands import vocab_multiple
    from tritongpt.model.config import get_config

    multiple = vocab_multiple(args) if hasattr(args, "vocab_multiple") else None  # dpo and rlhf: an LM head
    if args.init:
        from tritongpt.train.sft import load_init_base

        refuse_fresh_model_flags(args)
        model = load_init_base(args)  # (a GPTQ or AWQ folder: kept quantized, LoRA's frozen base)
        return model if multiple is None else model.pad_vocab(multiple)
    preset = args.model or "tiny"
    note(f"no --init checkpoint: the backbone is a randomly initialised {preset} "
         "(pass --init with an SFT run for a useful model)")
    return GPTModel(get_config(preset, vocab_size=args.vocab_size, vocab_multiple=multiple or 1))


# data_run_args' defaults: what a run from before they were recorded went with (Trainer's run_defaults)
DATA_DEFAULTS = {"num_pairs": 2000, "val_fraction": 0.1, "quantize": None, "group_size": None}


def add_data_args(p, unpaired: bool = False):
    """unpaired: kto's, which also takes unpaired examples (and makes two of each pair)."""
    kto = ("; or unpaired examples, {prompt, completion, label: true|false} (a chat's prompt a message list, its "
           "completion [answer]); a pair makes two, (prompt, chosen, true) and (prompt, rejected, false)") \
        if unpaired else ""
    p.add_argument("--data", default=None,
                   help="preference pairs: a .json, .jsonl or .parquet file of {prompt|instruction[,input], chosen, "
                        "rejected}, "
                        "or chats ({prompt: [messages], chosen: [answer], rejected: [answer]}, or chosen and "
                        f"rejected message lists alike but for their last); a pair's optional margin (every pair "
                        f"has one, or none) is `reward`'s, how much better chosen is{kto} (default: pairs built "
                        "from the embedded verifiable tasks)")
    from tritongpt.train.chat_template import add_chat_template_arg

    add_chat_template_arg(p)
    p.add_argument("--num-pairs", type=int, default=DATA_DEFAULTS["num_pairs"],
                   help="embedded training pairs (train split of the tasks) (default %(default)s)")
    held = "held-out pairs (or unpaired examples)" if unpaired else "held-out pairs"
    p.add_argument("--val-fraction", type=float, default=DATA_DEFAULTS["val_fraction"],
                   help=f"{held}: this share of --num-pairs from the tasks' val split, or of a --data file "
                        "(default %(default)s)")
    p.add_argument("--init", default=None,
                   help="SFT checkpoint to start from: run folder, ckpt folder or .safetensors; `reward` also "
                        "takes a reward model (a `tritongpt reward` checkpoint, or a Hugging Face "
                        "<Family>ForSequenceClassification) and trains it on, its head too "
                        "(default: a random --model, for trying things out)")
    p.add_argument("--tokenizer", default=None,
                   help=TOKENIZER_CHOICES + " (default: the --init run's saved tokenizer, "
                        "else by vocab size)")
    p.add_argument("--vocab-size", type=int, default=None, help="with no --init: the fresh model's vocab")


def check_num_pairs(args):
    """--num-pairs counts the pairs made from the embedded tasks: with a --data file, whose pairs are its own, it
    would do nothing (reward, dpo, kto, rlhf)."""
    from tritongpt.train.preference import is_embedded

    if args.num_pairs != DATA_DEFAULTS["num_pairs"] and not is_embedded(args.data):
        raise UserError(f"--num-pairs sets how many pairs are made from the embedded tasks; --data {args.data}'s "
                        "are the file's (--val-fraction holds some out): pass one of them")


def data_run_args(args, group_flag: str = "--group-size", base=None) -> dict:
    """The data flags of `reward`, `dpo`, `kto` and `rlhf` that a resume names when they change, the
    --init the run started from (`export --adapter` puts a LoRA run's update on it) and how QLoRA quantized it:
    --quantize's, or base's (the model set up from --init) own GPTQ or AWQ folder's (init_quantized, as sft
    records it: a resume's check_same_base, info and export --adapter read it)."""
    from tritongpt.commands import qlora_record
    from tritongpt.train.common import data_path

    return {"data": data_path(args.data), "num_pairs": args.num_pairs, "val_fraction": args.val_fraction,
            "init": data_path(getattr(args, "init", None)), **qlora_record(args, group_flag),
            "init_quantized": getattr(base, "init_quantized", None)}


def setup_preference_run(args, command: str, read_data=None):
    """What `reward`, `dpo` and `kto` share: validated TrainArgs, the pairs (bad data fails before any
    slow work), the backbone from --init (for `reward`, a whole RewardModel when --init is one; with --quantize,
    QLoRA's, its matrices quantized; a GPTQ or AWQ folder kept quantized, sft.load_init_base), and its tokenizer
    (saved beside the run). read_data(args) -> (train, held-out): other items than pairs (KTO's unpaired examples),
    each with the .format of its prompt."""
    from tritongpt.train.chat import note_template_mismatch
    from tritongpt.train.chat_template import chat_template_for
    from tritongpt.train.common import check_out_dir, check_resume_of, load_state, resume_checkpoint, set_seed
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.preference import note_batch_repeats, train_val_pairs
    from tritongpt.train.sft import pick_tokenizer
    from tritongpt.train.tokenizer import save_run_tokenizer

    set_seed(args.seed)
    targs = TrainArgs.from_namespace(args)
    targs.validate()
    check_num_pairs(args)
    if targs.sample_every:  # (0 by default here) the Trainer prints a language model's samples: there are none
        raise UserError(f"--sample-every prints a generated sample every N steps; {command} prints none: leave it "
                        "out")
    check_out_dir(targs.out_dir, targs.resume, targs.overwrite)  # before the tokenizer is written there
    if targs.resume:  # the Trainer checks it too, but after dpo's and kto's reference log-probs (minutes on a CPU)
        ckpt = resume_checkpoint(targs.out_dir, targs.resume)
        check_resume_of(ckpt, load_state(ckpt, mmap=True), command)
    train, val = (read_data(args) if read_data else
                  train_val_pairs(args.data, args.num_pairs, args.val_fraction, args.seed))
    note_batch_repeats(targs.batch_size, len(train), "--batch-size", "examples" if command == "kto" else "pairs",
                     args.data)
    note_template_mismatch([p.format for p in train + val], {"--init": args.init})
    if command == "reward" and is_reward_model(args.init):  # a reward model to train on, its head with it
        refuse_fresh_model_flags(args)
        backbone = RewardModel.load(args.init)
    else:
        backbone = build_backbone(args)
    common.set_moe_aux_loss(backbone, args)
    if getattr(args, "quantize", None):  # QLoRA: the base quantized before a file is written (a group that fits
        from tritongpt.commands import quantize_base  # no width is refused with nothing left in --out-dir)

        quantize_base(backbone.backbone if isinstance(backbone, RewardModel) else backbone, args)
    tok = pick_tokenizer(args.tokenizer, args.init, backbone.config.vocab_size)
    tok = chat_template_for(tok, command, args.chat_template, any(p.format == "chat" for p in train + val))
    save_run_tokenizer(tok, args.out_dir)
    return targs, train, val, backbone, tok


def cmd_reward(args):
    from tritongpt.commands import apply_lora, check_lora_args, check_qlora

    check_lora_args(args)  # before the slow set-up
    check_qlora(args)
    check_center_coefficient(args.center_rewards_coefficient)
    targs, train, val, init, tok = setup_preference_run(args, "reward")
    # (QLoRA: the backbone's matrices were quantized by the set-up; the scalar head stays float)
    if isinstance(init, RewardModel):  # --init a reward model (ours, or a Hugging Face classifier): its head trains on
        apply_lora(init.backbone, args, "--init's reward head")
        model = init.train()
    else:  # the scalar head is new: it trains whole
        model = RewardModel(apply_lora(init, args, "new reward head"))
    result = train_reward_model(model, tok, train, val, targs, run_args=data_run_args(args, base=init),
                                center_rewards_coefficient=args.center_rewards_coefficient)
    if not result["is_main"]:  # DDP: rank 0 reports
        return 0
    acc = result.get("val_acc")
    measured = "no held-out pairs to measure (--val-fraction)" if acc is None else \
        f"held-out pairwise accuracy {acc:.3f}"
    print(f"reward model: {len(train)} training pairs, {len(val)} held out; {measured}; "
          f"checkpoint {result['checkpoint']}")
    return 0


def add_cli(sub):
    from tritongpt.commands import add_lora_args, add_model_args, add_qlora_args
    from tritongpt.train.loop import add_train_args

    p = sub.add_parser("reward", help=command_help("reward"))
    add_model_args(p, default_model=None, default_text="tiny, with no --init")
    add_data_args(p)
    add_lora_args(p)
    add_qlora_args(p)
    p.add_argument("--center-rewards-coefficient", type=float, default=0.0, metavar="C",
                   help="add C * mean((r_chosen + r_rejected)^2) to the loss, pulling the scores' mean toward 0 "
                        "(TRL's center_rewards_coefficient, Eisenstein et al. 2023; 0: none) (default %(default)s)")
    common.add_moe_aux_arg(p)
    add_train_args(p, out_dir="runs/reward", max_steps=300, batch_size=16, lr=1e-4, min_lr=1e-5,
                   warmup_steps=20, eval_every=50, ckpt_every=100, sample_every=0, weight_decay=0.0)
    p.set_defaults(func=cmd_reward)


# -- export: a Hugging Face <Family>ForSequenceClassification folder ----------------------------------
# the class transformers' AutoModelForSequenceClassification builds for each model_type an export writes;
# OLMoE and Cohere (Cohere2) have none (tests check this table against transformers' own)
SEQUENCE_CLASSIFIERS = {
    "gpt2": "GPT2ForSequenceClassification", "gpt_neo": "GPTNeoForSequenceClassification",
    "gptj": "GPTJForSequenceClassification", "gpt_neox": "GPTNeoXForSequenceClassification",
    "falcon": "FalconForSequenceClassification", "phi": "PhiForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification", "stablelm": "StableLmForSequenceClassification",
    "llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
    "smollm3": "SmolLM3ForSequenceClassification", "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification", "gemma3_text": "Gemma3TextForSequenceClassification",
    "olmo": "OlmoForSequenceClassification", "olmo2": "Olmo2ForSequenceClassification",
    "olmo3": "Olmo3ForSequenceClassification", "bloom": "BloomForSequenceClassification",
    "mpt": "MptForSequenceClassification", "mixtral": "MixtralForSequenceClassification",
    "qwen3_moe": "Qwen3MoeForSequenceClassification", "qwen2_moe": "Qwen2MoeForSequenceClassification",
    "gpt_oss": "GptOssForSequenceClassification", "ministral": "MinistralForSequenceClassification",
    "glm4": "Glm4ForSequenceClassification", "exaone4": "Exaone4ForSequenceClassification",
    "arcee": "ArceeForSequenceClassification", "starcoder2": "Starcoder2ForSequenceClassification",
    "nemotron": "NemotronForSequenceClassification", "gpt_bigcode": "GPTBigCodeForSequenceClassification",
}
NO_CLASSIFIER = ("OLMoE", "Cohere", "Cohere2", "Granite", "GraniteMoe")  # export_target's family names whose model_type has none
# the LM head's tensors in the families' causal-LM files (GPT-NeoX calls its head embed_out): a classifier has
# `score` in their place
LM_HEAD_TENSORS = ("lm_head.weight", "lm_head.bias", "embed_out.weight")


def is_reward_checkpoint(path) -> bool:
    """A tritongpt reward model's .safetensors (what RewardModel.load reads), not a policy's."""
    from tritongpt.model.gpt import safetensors_metadata

    return str(path).endswith(".safetensors") and safetensors_metadata(path).get("kind") == KIND


def refuse_no_classifier(family: str) -> None:
    if family in NO_CLASSIFIER:
        raise UserError(f"this reward model's backbone is {family}'s, and transformers has no "
                        f"{family.replace('-', '')}ForSequenceClassification to read its score: it cannot be "
                        "exported (a backbone of another family can)")


def fold_head_bias(model: RewardModel) -> float:
    """Moves the head's bias b into the final norm's bias, where Hugging Face's classifiers (whose score Linear
    has none) still add it: head(LN(x)) = w . (g x^ + beta) + b = w . (g x^ + beta + b w / |w|^2). Returns the
    b that could not go (no norm bias: an RMSNorm's, a bias-free LayerNorm's), which the exported scores lack.
    (Bradley-Terry's loss sees only score differences: b stays at its zero init but for float rounding.)"""
    b = model.head.bias.detach().double()
    norm_bias = getattr(model.backbone.final_norm, "bias", None)
    w = model.head.weight.detach().double()[0]
    if float(b) == 0.0 or norm_bias is None or not bool(w.any()):
        return float(b)
    with torch.no_grad():
        norm_bias.copy_((norm_bias.double() + b * w / w.dot(w)).to(norm_bias.dtype))
        model.head.bias.zero_()
    return 0.0


def pad_token_for(tok_files: dict, end_ids) -> tuple:
    """(id, text) of the token the exported folder pads with: Hugging Face's classifiers read the score at the
    last token that is not config.pad_token_id, so it must not be one our scores are read at (the EOS, a chat
    template's end of turn: end_ids). A pad-like special token of the tokenizer if it has one, else an ordinary
    token (only ever seen after the scored one, by which causal attention is blind to it): a byte-level BPE's NUL
    byte, "Ā", where it has one, else the lowest-numbered. transformers splits text on a named pad token before
    encoding it, so an ordinary one's spelling in a text gets the pad's id where our encoder merges it: GPT-2's
    id 0 is "!" ("!!" would come out as two pads), while "Ā" is only ever U+0100 itself in a text. (0 with no
    text when the tokenizer is not exported.)"""
    vocab, specials = {}, {}
    if "tokenizer.json" in tok_files:
        spec = json.loads(tok_files["tokenizer.json"])
        model_vocab = spec.get("model", {}).get("vocab", {})
        vocab = dict(model_vocab) if isinstance(model_vocab, dict) else {v[0]: i for i, v in enumerate(model_vocab)}
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    elif "vocab.json" in tok_files:
        vocab = json.loads(tok_files["vocab.json"])
        specials = {t: vocab[t] for t in vocab if t.startswith("<|") and t.endswith("|>")}
    for text, i in sorted(specials.items(), key=lambda kv: kv[1]):
        if "pad" in text.lower() and i not in end_ids:
            return i, text
    plain = sorted((i, text) for text, i in vocab.items() if text not in specials and i not in end_ids)
    nul = bytes_to_unicode()[0]
    if isinstance(vocab.get(nul), int) and nul not in specials and vocab[nul] not in end_ids:
        return vocab[nul], nul
    if plain:
        return plain[0]
    return next(i for i in range(len(end_ids) + 1) if i not in end_ids), None


def export_reward_model(model: RewardModel, out_dir, export, eos_token_id, pad_token_id: int) -> list:
    """model as a Hugging Face <Family>ForSequenceClassification folder: the family's causal-LM export (export,
    as commands.export_target picks it) with the LM head replaced by `score` (the head's weight; its bias folded
    first, fold_head_bias), config.json's architectures, one label and pad_token_id. -> the paths written."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from tritongpt.model.gpt import readable_like_other_files

    paths = export(model.backbone, out_dir, eos_token_id)
    out = Path(out_dir)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    name = SEQUENCE_CLASSIFIERS.get(config["model_type"])
    if name is None:  # NO_CLASSIFIER refused it before: an export of a new model_type not in the table
        raise UserError(f"no Hugging Face sequence classifier is known for model_type {config['model_type']!r}")
    tensors = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if k not in LM_HEAD_TENSORS}
    dtype = next(iter(tensors.values())).dtype
    tensors["score.weight"] = model.head.weight.detach().to("cpu", dtype, copy=True).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    readable_like_other_files(out / "model.safetensors")  # a new file again: the family export's mode redone
    config.update(architectures=[name], id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  pad_token_id=pad_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return paths
