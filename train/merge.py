"""`tritongpt merge`: several checkpoints of one model into one, by mergekit's methods (Goddard et al. 2024).

Every floating tensor is merged on its own, the same way, from the models' tensors of that name:
- linear: sum_i w_i theta_i / sum_i w_i. Model soups (Wortsman et al. 2022), or, of reward models trained from
  one start on one preference set, WARM (Rame et al. 2024).
- slerp: two models, along the arc between the two tensors at t (t = 0: the first, 1: the second), each flattened
  and their angle taken from their directions; where they are nearly parallel (|cos| > 0.9995) the arc is a line,
  and lerp is used (mergekit's rule).
- the task-vector methods, with a --base the models were fine-tuned from: each model's task vector
  tau_i = theta_i - base, and base + sum_i w_i tau_i (task_arithmetic, Ilharco et al. 2023); ties (Yadav et al.
  2023) first keeps each tau_i's `density` fraction of largest magnitudes (per tensor), elects a sign per element
  (that of sum_i w_i tau_i), and averages the agreeing w_i tau_i by their weights; dare_linear and dare_ties
  (Yu et al. 2024) keep each element with probability `density` and divide by it (the expected tau unchanged),
  then sum (dare_linear) or elect signs as ties, without the average (mergekit's defaults). --scale multiplies
  the merged task vector (the TIES paper's lambda; 1: none).
The models must be one architecture (the same config but for kernels and dropout: a field that differs is named)
and one tokenizer (the same ids: merging a model whose id 17 is another word would average other words'
embeddings). LoRA checkpoints come merged, reward models merge into a reward model (head included), Hugging Face
folders and Hub ids are read as `--weights` reads them. Every model is held in memory at once (fp32), so this is
for the small models this project trains; mergekit streams tensors for large ones.
"""
import json
from pathlib import Path

import torch

from tritongpt.errors import UserError, note

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
TASK_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")  # those that need --base
SPARSE_METHODS = ("ties", "dare_linear", "dare_ties")  # those that take --density
DARE_METHODS, DARE_SEED = ("dare_linear", "dare_ties"), 0  # those that take --seed, and its default
NEARLY_PARALLEL = 0.9995  # mergekit's DOT_THRESHOLD: past it slerp's sin(theta) is too small to divide by


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a and b (one shape) at t along the arc between them, as mergekit's slerp: the angle is that of the
    directions, the weights sin((1-t) theta)/sin(theta) and sin(t theta)/sin(theta) go on the tensors themselves."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = a64.norm(), b64.norm()
    if na < 1e-8 or nb < 1e-8:  # a zero tensor has no direction: the line between them
        return torch.lerp(a, b, t)
    cos = torch.dot(a64 / na, b64 / nb).clamp(-1.0, 1.0)
    if cos.abs() > NEARLY_PARALLEL:
        return torch.lerp(a.double(), b.double(), t).to(a.dtype)
    theta = torch.arccos(cos)
    s0, s1 = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (s0 * a.double() + s1 * b.double()).to(a.dtype)


def keep_largest(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: tau with all but its round(density * numel) largest magnitudes set to 0 (at least one kept:
    mergekit asserts there instead)."""
    if density >= 1.0:
        return tau
    k = max(1, int(density * tau.numel()))
    flat = tau.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().argsort(descending=True)[:k]] = True
    return (flat * mask).view_as(tau)


def drop_and_rescale(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each element kept with probability density, and divided by it, so that tau's expectation stays."""
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) < density
    return (tau.double() * keep / density).to(tau.dtype)


def merge_tensors(method: str, tensors: list, weights: list, base=None, t: float = 0.5, density: float = 1.0,
                  scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One tensor from the models' tensors of one name (and the base's, for the task-vector methods). Computed in
    float64, returned in the first tensor's dtype."""
    dtype = tensors[0].dtype
    xs = [x.double() for x in tensors]
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * xs[0].dim()))
    if method == "linear":
        return ((torch.stack(xs) * w).sum(0) / w.sum()).to(dtype)
    if method == "slerp":
        return slerp(t, xs[0], xs[1]).to(dtype)
    b = base.double()
    taus = [x - b for x in xs]
    if method == "ties":
        taus = [keep_largest(tau, density) for tau in taus]
    elif method in ("dare_linear", "dare_ties"):
        taus = [drop_and_rescale(tau, density, generator) for tau in taus]
    weighted = torch.stack(taus) * w
    if method in ("ties", "dare_ties"):
        # the elected sign: that of the weighted sum (a 0 sum elects +); a model's element joins when its sign
        # is the elected one (a trimmed 0 never does)
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
        agree = torch.sign(weighted) == elected
        mixed = (weighted * agree).sum(0)
        if method == "ties":  # the agreeing models' weighted mean (mergekit: a 0 divisor is 1)
            divisor = (w * agree).sum(0)
            mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(0)
    return (b + scale * mixed).to(dtype)


def load_for_merge(path):
    """(model, "reward" | "lm") of a checkpoint, run folder, Hugging Face folder or classifier."""
    from tritongpt.train.common import resolve_checkpoint
    from tritongpt.train.gpt2_weights import classifier_name, is_hf_weights, load_checkpoint
    from tritongpt.train.reward import RewardModel, is_reward_checkpoint

    if not Path(path).exists():
        raise UserError(f"merge: {path} not found (a checkpoint file or folder, a run folder, or a Hugging Face "
                        "folder)")
    weights = resolve_checkpoint(path)
    if is_reward_checkpoint(weights) or (is_hf_weights(weights) and classifier_name(weights) is not None):
        return RewardModel.load(path), "reward"
    return load_checkpoint(path), "lm"


# config fields that are not the model's function: how it runs (kernels) and how it trains (dropout, the MoE's
# load-balancing weight)
NOT_ARCHITECTURE = ("kernels", "dropout", "moe_aux_loss")


DEFAULTED = ("mlp_hidden", "n_kv_head", "attention_head_dim", "rotary_dim", "attention_multiplier")  # 0: a default


def architecture(cfg) -> dict:
    """cfg's fields that say what the model computes, those whose 0 means a default as the value it means (a Hugging
    Face folder, our export's too, says mlp_hidden, n_kv_head, attention_head_dim and the attention's scale
    explicitly: the same model)."""
    import math

    d = {k: v for k, v in cfg.to_dict().items() if k not in NOT_ARCHITECTURE}
    d.update(mlp_hidden=cfg.ff_hidden, n_kv_head=cfg.kv_heads, attention_head_dim=cfg.head_dim)
    if cfg.position_encoding == "rope":
        d["rotary_dim"] = cfg.rotary_dim or cfg.head_dim
    if cfg.scale_attention and not cfg.attention_scale_width:
        d["attention_multiplier"] = cfg.attention_multiplier or 1.0 / math.sqrt(cfg.head_dim)
    return d


def check_same_model(paths, models, kinds) -> None:
    """One kind (causal LMs or reward models) and one architecture, or a UserError naming what differs."""
    if len(set(kinds)) > 1:
        which = [f"{p} is {'a reward model' if k == 'reward' else 'a causal LM'}" for p, k in zip(paths, kinds)]
        raise UserError(f"merge: {'; '.join(which)}: merge causal LMs or reward models, not both")
    first, first_raw = architecture(models[0].config), models[0].config.to_dict()
    for p, m in zip(paths[1:], models[1:]):
        cfg, raw = architecture(m.config), m.config.to_dict()
        # a default (0) in both that differs follows from a field named here (n_embd, n_head): not named itself
        diffs = [f"{k} {cfg.get(k)} ({paths[0]}: {first.get(k)})" for k in sorted(set(first) | set(cfg))
                 if first.get(k) != cfg.get(k) and (first_raw.get(k) or raw.get(k) or k not in DEFAULTED)]
        if diffs:
            raise UserError(f"merge: {p} is another model than {paths[0]}: {', '.join(diffs)}; only models of one "
                            "architecture and size merge, tensor by tensor")


def check_same_tokenizer(paths, models, spec=None):
    """The tokenizer every model was saved with (pick_tokenizer's choice), the same ids for all, or a UserError.
    spec (--tokenizer): the tokenizer of the models saved without one (a bare weights file; GPT-2's offline)."""
    from tritongpt.train.gpt_neo_weights import hub_tokenizer
    from tritongpt.train.sft import pick_tokenizer
    from tritongpt.train.tokenizer import same_ids, saved_tokenizer_path

    def saved(p):
        return saved_tokenizer_path(p) is not None or hub_tokenizer(p) is not None

    if spec is not None and all(saved(p) for p in paths):  # (it was never read: not even a bad path was said)
        raise UserError(f"merge: --tokenizer {spec} stands in for a tokenizer the models were saved without, and "
                        "every model here has its own: it would do nothing (leave it out)")
    toks = [pick_tokenizer(None if saved(p) else spec, p, m.config.vocab_size) for p, m in zip(paths, models)]
    for p, tok in zip(paths[1:], toks[1:]):
        if not same_ids(tok, toks[0]):
            raise UserError(f"merge: {p}'s tokenizer is not {paths[0]}'s (other ids for the same text): a merge "
                            "would average the embeddings of different tokens")
    return toks[0]


def merge_models(method, models, weights=None, base=None, t=0.5, density=1.0, scale=1.0, seed=0):
    """A new model, like models[0], whose every parameter is merge_tensors' of the models' (and base's). The
    models hold no buffers (RoPE's and ALiBi's tables are made on the fly), so the parameters are the model."""
    import copy

    weights = [1.0] * len(models) if weights is None else list(weights)
    out = copy.deepcopy(models[0])
    generator = torch.Generator().manual_seed(seed)
    states = [dict(m.named_parameters()) for m in models]
    base_state = None if base is None else dict(base.named_parameters())
    with torch.no_grad():
        for name, p in out.named_parameters():  # a tied LM head is one parameter, merged once
            p.copy_(merge_tensors(method, [s[name] for s in states], weights,
                                  None if base_state is None else base_state[name], t, density, scale, generator))
    return out


def check_merge_args(args) -> None:
    """The flags' rules, before any model is read."""
    n = len(args.weights)
    if args.method == "slerp" and n != 2:
        raise UserError(f"merge --method slerp interpolates two models, got {n}")
    if n < 2 and args.method in ("linear", "slerp"):
        raise UserError(f"merge --method {args.method} needs two models or more, got {n}")
    if args.method in TASK_METHODS and args.base is None:
        raise UserError(f"merge --method {args.method} adds the models' differences from the model they were "
                        "fine-tuned from: pass it as --base")
    if args.method not in TASK_METHODS and args.base is not None:
        raise UserError(f"merge --method {args.method} takes no --base (task_arithmetic, ties, dare_linear and "
                        "dare_ties do)")
    if args.coefficients is not None:
        if args.method == "slerp":
            raise UserError("merge --method slerp takes --t, not --coefficients")
        if len(args.coefficients) != n:
            raise UserError(f"merge: --coefficients has {len(args.coefficients)} numbers for {n} models: one each")
        if not all(torch.isfinite(torch.tensor(c)) for c in args.coefficients):
            raise UserError(f"merge: --coefficients must be finite numbers, got {args.coefficients}")
        if args.method == "linear" and abs(sum(args.coefficients)) < 1e-8:
            raise UserError(f"merge --method linear divides by the coefficients' sum, which is 0: "
                            f"{args.coefficients}")
    if args.t is not None and args.method != "slerp":
        raise UserError("merge: --t is slerp's (where along the arc between two models)")
    if args.t is not None and not 0.0 <= args.t <= 1.0:
        raise UserError(f"merge --t must be in [0, 1] (0: the first model, 1: the second), got {args.t}")
    if args.density is not None:
        if args.method not in SPARSE_METHODS:
            raise UserError("merge: --density is ties', dare_linear's and dare_ties' (the fraction of each task "
                            "vector kept)")
        if not 0.0 < args.density <= 1.0:
            raise UserError(f"merge --density must be in (0, 1], got {args.density}")
    if args.scale != 1.0 and args.method not in TASK_METHODS:
        raise UserError("merge: --scale multiplies the merged task vector (task_arithmetic, ties, dare_linear, "
                        "dare_ties)")
    if not torch.isfinite(torch.tensor(args.scale)):
        raise UserError(f"merge --scale must be a finite number, got {args.scale}")
    from tritongpt.train.common import check_seed

    check_seed(args.seed)  # dare's generator: torch's overflow error otherwise, after every model was read
    if args.seed != DARE_SEED and args.method not in DARE_METHODS:  # the other methods draw nothing
        raise UserError(f"merge: --seed draws dare's random drops (dare_linear, dare_ties); --method {args.method} "
                        "draws none")


def cmd_merge(args):
    from tritongpt.train.chat import run_template
    from tritongpt.train.common import model_out_folder
    from tritongpt.train.tokenizer import save_run_tokenizer

    check_merge_args(args)
    paths = list(args.weights) + ([args.base] if args.base else [])
    out = Path(args.out)
    target = model_out_folder("merge", out, paths, args.overwrite, "the merge", "one of the models merged")
    loaded = [load_for_merge(p) for p in paths]
    models, kinds = [m for m, _ in loaded], [k for _, k in loaded]
    check_same_model(paths, models, kinds)
    tok = check_same_tokenizer(paths, models, args.tokenizer)
    formats = {run_template(p) for p in args.weights}
    fmt = formats.pop() if len(formats) == 1 else None
    if fmt is None and len(formats) > 1:
        note(f"merge: the models were tuned on different prompt formats ({', '.join(sorted(map(str, formats)))}): "
             "the merge records none (chat --template picks one)")
    density = 1.0 if args.density is None else args.density
    if args.method in SPARSE_METHODS and args.density is None:
        note(f"merge --method {args.method} without --density keeps every element (density 1): pass one, e.g. "
             "--density 0.5, to trim the task vectors")
    merged = merge_models(args.method, models[:len(args.weights)], args.coefficients,
                          models[-1] if args.base else None, 0.5 if args.t is None else args.t, density, args.scale,
                          args.seed)
    recipe = {"method": args.method, "models": [str(p) for p in args.weights], "base": args.base,
              "coefficients": args.coefficients, "t": args.t, "density": args.density, "scale": args.scale,
              "seed": args.seed}
    out.mkdir(parents=True, exist_ok=True)
    merged.save(target, {"merge": json.dumps(recipe), **({"prompt_format": fmt} if fmt else {})})
    save_run_tokenizer(tok, out)
    n = sum(p.numel() for p in merged.parameters())
    print(f"merge: {args.method} of {len(args.weights)} {'reward models' if kinds[0] == 'reward' else 'models'}"
          f"{' on ' + str(args.base) if args.base else ''} -> {target} ({n:,} parameters)")
    return 0


def add_cli(sub):
    from tritongpt.cli import command_help

    p = sub.add_parser("merge", help=command_help("merge"),
                       description="Merge checkpoints of one model (one architecture and tokenizer) into one, "
                                   "tensor by tensor, by mergekit's methods. The result is a checkpoint folder "
                                   "that generate, chat, eval, export and --init read.")
    p.add_argument("weights", nargs="+", metavar="MODEL",
                   help="the models: checkpoint files or folders, run folders (their newest checkpoint), Hugging "
                        "Face folders or Hub ids; reward models merge into a reward model")
    p.add_argument("--out", required=True, help="the folder to write model.safetensors (and the tokenizer) into")
    p.add_argument("--method", choices=METHODS, default="linear",
                   help="linear: the weighted mean; slerp: along the arc between two models; task_arithmetic, "
                        "ties, dare_linear, dare_ties: the base plus the models' merged differences from it "
                        "(default %(default)s)")
    p.add_argument("--base", default=None, help="the model the others were fine-tuned from (the task-vector "
                                                "methods' base)")
    p.add_argument("--coefficients", type=float, nargs="+", default=None, metavar="W",
                   help="each model's weight, in order (default: 1 each; linear divides by their sum)")
    p.add_argument("--t", type=float, default=None, help="slerp: 0 gives the first model, 1 the second (default 0.5)")
    p.add_argument("--density", type=float, default=None,
                   help="ties, dare: the fraction of each task vector's elements kept (default 1: all)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="the task-vector methods: multiply the merged difference by S (default %(default)s)")
    p.add_argument("--seed", type=int, default=DARE_SEED, help="dare's random drops (default %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="the tokenizer of models saved without one (default: the one saved with each model, else "
                        "gpt2 for a 50257-token vocabulary, else default); saved with the merge")
    p.add_argument("--overwrite", action="store_true", help="replace a model.safetensors already in --out")
    p.set_defaults(func=cmd_merge)
