"""The `info`, `generate` and `export` subcommands."""

import argparse

from tritongpt.errors import UserError, note, read_json_object, read_text_file
from tritongpt.train.tokenizer import HF_WEIGHTS_HELP, HUB_REPO_HELP, TOKENIZER_CHOICES
from tritongpt.cli import command_help

SAMPLE_SEPARATOR = "-" * 15  # between --num-samples texts, as nanoGPT's sample.py prints them
GENERATE_TEMPERATURE = 0.8  # generate's sampling default, as nanoGPT's sample.py (beam search: 0)


def add_model_args(p, default_model="tiny", default_text=None):
    """Arguments shared by every command that builds a model."""
    p.add_argument("--model", default=default_model,
                   help="preset: gpt2-small|gpt2-medium|gpt2-large|gpt2-xl|gpt-neo-125m|gpt-neo-1.3B|gpt-neo-2.7B|"
                        "tiny|mini (default "
                        + (default_text or default_model or "tiny, or what --weights holds") + ")")
    p.add_argument("--kernels", default="auto",
                   help="reference | triton | auto (Triton on CUDA, reference on CPU; before Ampere no "
                        "Triton MLP or attention) | "
                        "comma list of layernorm,mlp,attention,cross_entropy,rope (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default %(default)s)")


def add_vocab_multiple_arg(p, default, default_text):
    """--vocab-multiple (GPTConfig.vocab_multiple), shared by pretrain, sft, dpo, rlhf and bench train."""
    p.add_argument("--vocab-multiple", type=int, default=default,
                   help="pad the embedding and LM head rows to a multiple of this (64 for GPT-2: 50257 -> "
                        f"50304, faster head matmuls on a GPU; default: {default_text})")


LORA_ALPHA = 16.0  # --lora-alpha's default (peft's LoraConfig has 8; ours, the LoRA paper's runs', 16)


def add_lora_args(p):
    """--lora-rank, --lora-alpha, --lora-targets (model/lora.py), shared by sft, reward, dpo, kto and rlhf."""
    p.add_argument("--lora-rank", type=int, default=0,
                   help="train a rank-r LoRA update of the --lora-targets matrices instead of every weight "
                        "(the rest frozen, but for reward's and PPO's new heads; checkpoints hold both, and load "
                        "merged everywhere they are only used; default 0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=LORA_ALPHA,
                   help="LoRA's update is scaled by alpha / rank (default %(default)s)")
    p.add_argument("--lora-targets", default=None,
                   help="the matrices LoRA adapts: attn (query, key, value, output), mlp (both), or both "
                        "(default: attn,mlp; attn for a mixture-of-experts model, whose experts LoRA does not "
                        "adapt)")


def check_lora_args(args):
    """--lora-rank, --lora-alpha and --lora-targets of a trainer, before the model loads: alpha and targets set the
    rank's update, and without one they would do nothing."""
    from tritongpt.model.lora import check_lora

    check_lora(args.lora_rank, args.lora_alpha, args.lora_targets)
    given = [f for f, v in (("--lora-alpha", args.lora_alpha != LORA_ALPHA),
                            ("--lora-targets", args.lora_targets is not None)) if v]
    if given and not args.lora_rank:
        raise UserError(f"{given[0]} sets the LoRA update of --lora-rank r: without it (full fine-tuning) it does "
                        "nothing: pass --lora-rank, or leave it out")


def add_qlora_args(p, group_flag: str = "--group-size"):
    """--quantize and --group-size of a trainer with LoRA (sft, dpo, kto, reward, rlhf): QLoRA's quantized frozen base.
    group_flag: the int4 group's flag where --group-size means something else (rlhf's GRPO groups)."""
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="QLoRA (with --lora-rank): the frozen base's matrices weight-only int8 or int4 (groups of "
                        f"{group_flag} inputs) while the LoRA updates train beside them in float; the embeddings, "
                        "norms and heads (the LM head, reward's scalar head) stay float (default: the base as loaded)")
    add_group_size_arg(p, group_flag)


def check_qlora(args, group_flag: str = "--group-size"):
    """--quantize and --group-size (group_flag) of a trainer, before the model loads: a quantized base needs LoRA."""
    if args.quantize is None:
        if getattr(args, flag_dest(group_flag)) is not None:
            raise UserError(f"{group_flag} sets int4's groups: pass --quantize int4 too")
        return
    group_size(args, group_flag)
    if not args.lora_rank:
        raise UserError(f"--quantize {args.quantize} freezes the base's matrices as {args.quantize}: they train "
                        "only through LoRA updates (QLoRA): pass --lora-rank")


def folder_spec(args) -> dict | None:
    """hf_quant.folder_quantization's spec of a LoRA trainer's --init where it is a GPTQ, AWQ or bitsandbytes Hugging
    Face folder whose config.json says kept quantized (GGUF_SPEC for any .gguf file), else None: the load is then let
    keep it so (quantized_ok), and folder_base decides from the model it gave. The config alone cannot say: a 4-bit
    folder whose groups no int4 group size divides, an 8-bit GPTQ one with a layer of several groups, or a
    bitsandbytes 8-bit one with a linear of the blocks left float, loads dequantized (its note says why), an ordinary
    float model (so does a .gguf with a linear of a type not kept: Q5_0, Q5_K, ...)."""
    from pathlib import Path

    from tritongpt.train.common import NoCheckpoint, resolve_checkpoint
    from tritongpt.train.gpt2_weights import adapter_folder, is_hf_weights
    from tritongpt.train.hf_quant import folder_quantization

    p = Path(args.init).expanduser()
    if not p.exists():
        return None
    try:
        path = resolve_checkpoint(p)
    except NoCheckpoint:  # (the load says so)
        return None
    if path.suffix == ".gguf":  # (no config: the load alone says whether its linears are kept: gguf_import)
        return GGUF_SPEC
    if not is_hf_weights(path) or adapter_folder(path) is not None:
        return None
    return folder_quantization(path.parent / "config.json")[0]


# A .gguf --init's "spec": the file itself says nothing before it loads (one with a linear of a type not kept loads
# float), so folder_base decides from the model, as for a folder the config calls quantized
GGUF_SPEC = {"method": "gguf", "_where": "its blocks' linears kept in the file's own Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K "
                                        "blocks"}


def folder_base(args, model, spec: dict | None) -> str | None:
    """A LoRA trainer's --init (sft, dpo, kto, reward, rlhf: sft.load_init_base) when it is a GPTQ, AWQ or
    bitsandbytes Hugging Face folder that loaded kept quantized (train/hf_quant.py: 4-bit as int4, 8-bit symmetric
    one-group GPTQ and bitsandbytes 8-bit as int8), or a .gguf file whose linears loaded kept (gguf_import._load_kept:
    Q8_0 as int8, Q4_0 / Q4_1 as int4): its own matrices are the frozen base LoRA trains beside (QLoRA on
    a pre-quantized base, as peft does on a GPTQModel or AutoAWQ model). model: what the load gave (spec, folder_spec's,
    not None: loaded with quantized_ok), so that this says what the model is, not what the config alone suggests: a
    folder read dequantized is a float model, fully fine-tuned like any other. Returns what the run records of it
    ("gptq int4", "awq int4", "gptq int8", "bitsandbytes int8", "gguf int4"), None for any other --init. Refused by
    name: full fine-tuning (no float weights to train), --quantize on top (the base is quantized already) and
    --vocab-multiple (pad_vocab rebuilds float models only), not by the loader's general refusal."""
    from pathlib import Path

    from tritongpt.train.common import resolve_checkpoint
    from tritongpt.train.gpt2_weights import hf_quantization

    mode = getattr(model, "quantized", None)
    if spec is None or not mode:  # a float --init, or a folder read as its dequantized float model (its note said so)
        return None
    method = spec["method"]
    where = spec["_where"] if spec is GGUF_SPEC else \
        hf_quantization(resolve_checkpoint(Path(args.init).expanduser()).parent / "config.json")["_where"]
    if args.quantize is not None:
        raise UserError(f"--quantize {args.quantize}: --init {args.init} is {method.upper()}-quantized already "
                        f"({where}), its matrices read as {mode}: LoRA trains on that base as it is: leave --quantize "
                        "out")
    if not args.lora_rank:
        raise UserError(f"--init {args.init} is {method.upper()}-quantized ({where}), its matrices read as {mode}: "
                        "they train only through LoRA updates beside them (QLoRA on its own quantization): pass "
                        "--lora-rank (full fine-tuning needs the float weights it was quantized from)")
    if getattr(args, "vocab_multiple", None) is not None:  # (pad_vocab rebuilds a float model's rows)
        raise UserError(f"--vocab-multiple {args.vocab_multiple}: --init {args.init} is {method.upper()}-quantized "
                        f"({where}): its model is kept as --init holds it, its embedding and LM head rows "
                        "unpadded: leave --vocab-multiple out")
    return f"{method} {mode}"


def qlora_record(args, group_flag: str = "--group-size") -> dict:
    """What a trainer's run record keeps of QLoRA's flags: the group size used (128 when not given), so that a resume
    naming the default is the same run; None without int4 (a trainer without the flags: no quantization). Its key is
    group_flag's (rlhf's quantize_group_size)."""
    mode = getattr(args, "quantize", None)
    return {"quantize": mode, flag_dest(group_flag): group_size(args, group_flag) if mode == "int4" else None}


def qlora_recorded(saved: dict, group_flag: str = "--group-size") -> dict:
    """A run record's args as qlora_record writes them now, for a resume to compare: runs recorded before it kept
    the group size used (sft's from before) have None for int4's default group, which was the same 128."""
    key = flag_dest(group_flag)
    if saved.get("quantize") != "int4" or saved.get(key) is not None:
        return saved
    return {**saved, key: DEFAULT_GROUP_SIZE}


def quantize_base(model, args, group_flag: str = "--group-size"):
    """--quantize on a trainer's --init model before apply_lora adds the updates (QLoRA): every matrix of the
    blocks, not the LM head (the fused head + loss keeps its float weight; a tied head stays the embedding). Says
    what it saved, on stderr. group_flag: add_qlora_args'."""
    check_qlora(args, group_flag)
    if args.quantize is None:
        return model
    from tritongpt.model.quant import GroupSizeError, linear_bytes, quantize as quantize_model

    before = linear_bytes(model)
    try:
        quantize_model(model, args.quantize, head=False, group_size=group_size(args, group_flag))
    except GroupSizeError as e:  # a group that fits no width, named by this command's flag (rlhf's is its own)
        raise UserError(f"{e} (the group: {group_flag})") from None
    note(f"QLoRA: the base's {model.quantized_linears} matrices {describe_quantized(model)} weight-only, "
         f"{before / 2**20:,.1f} MiB -> {linear_bytes(model) / 2**20:,.1f} MiB (the LM head stays float)")
    return model


def apply_lora(model, args, whole_head: str | None = None):
    """--lora-rank's LoRA on `model` (in place), with a line on what it trains; whole_head: a head
    beside it, which trains whole (reward's, new or --init's; PPO's new value head)."""
    import sys

    from tritongpt.model.lora import add_lora

    targets = args.lora_targets
    if targets is None:  # the default: every dense matrix there is
        targets = "attn" if model.config.n_experts else "attn,mlp"
        if model.config.n_experts and args.lora_rank:
            note(f"LoRA on the attention only: this model's MLPs are {model.config.n_experts} experts, which LoRA "
                 "does not adapt (they stay frozen)")
    add_lora(model, args.lora_rank, args.lora_alpha, targets)
    if args.lora_rank:
        from tritongpt.model.quant import QuantLinear

        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # QLoRA's quantized matrices are buffers, not parameters: counted as the weights (and biases) they stand for
        frozen = sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
                     for m in model.modules() if isinstance(m, QuantLinear))
        mode = f", {frozen:,} of them the base's {model.quantized} matrices" if frozen else ""
        print(f"LoRA rank {args.lora_rank} (alpha {args.lora_alpha:g}) on {model.config.lora_targets}: "
              f"{trained:,} of {model.num_params() + frozen:,} parameters train{mode}"
              + (f", and the {whole_head} whole" if whole_head else ""), file=sys.stderr)
    return model


def vocab_multiple(args):
    """args.vocab_multiple, checked here so a bad value is a one-line error naming the flag."""
    if args.vocab_multiple is not None and args.vocab_multiple < 1:
        raise UserError(f"--vocab-multiple must be a positive integer, got {args.vocab_multiple}")
    return args.vocab_multiple


def _what_it_means(cfg, key, value) -> str:
    """What a stored field that is not its own value stands for (0 = a rule, a setting another field
    overrides), so that a reader of `info` does not have to know GPTConfig's conventions."""
    from tritongpt.model.layers import swiglu_hidden

    if key == "mlp_hidden" and cfg.mlp in ("swiglu", "geglu") and not value:
        return f" (Llama's rule: {swiglu_hidden(cfg.n_embd)})"
    if key == "mlp_hidden" and cfg.mlp == "relu2" and not value:
        return f" (4 n_embd: {4 * cfg.n_embd})"
    if key == "n_kv_head" and not value:
        return f" (as many as the heads: {cfg.n_head})"
    if key == "attention_head_dim" and not value:
        return f" (n_embd / n_head: {cfg.head_dim})"
    if key == "rotary_dim" and not value and cfg.position_encoding == "rope":
        return f" (the whole head: {cfg.head_dim})"
    if key == "n_experts" and not value:
        return " (a dense MLP)"
    if key in ("experts_per_token", "moe_norm_topk") and not cfg.n_experts:
        return " (no effect: n_experts 0)"
    if key == "norm_bias" and cfg.norm != "layernorm":
        return f" (no effect: {cfg.norm} has no bias)"
    if key == "qkv_bias" and value and not cfg.bias:
        return " (no effect: bias False drops every bias" + (", and qkv_bias_only gives q/k/v theirs)"
                                                             if cfg.qkv_bias_only else ")")
    return ""


def cmd_info(args):
    import torch

    from tritongpt._env import triton_interpreting
    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel

    if args.weights:
        from tritongpt.train.common import load_state, resolve_checkpoint
        from tritongpt.train.gpt2_weights import load_checkpoint

        from tritongpt.train.reward import RewardModel, is_reward_model

        if args.untied:
            raise UserError("--untied counts a preset with its own LM head; --weights has the head it has")
        reward = RewardModel.load(args.weights, quantized_ok=True) if is_reward_model(args.weights) else None
        if reward and args.model:  # (as eval refuses it: a reward model's backbone is its saved config's)
            raise UserError(f"--model names the heads of a GPT-2 file without config.json; {args.weights} is a reward "
                            "model, with its own config: leave --model out")
        # --model: the heads of a GPT-2 file without config.json
        model = reward.backbone if reward else load_checkpoint(args.weights, args.model, quantized_ok=True)
        cfg, n, name = model.config, model.num_params(), str(resolve_checkpoint(args.weights))
    else:
        cfg = get_config(args.model or "gpt2-small", tie_weights=not args.untied)
        with torch.device("meta"):
            n = GPTModel(cfg).num_params()
        name = args.model or "gpt2-small"
    print(f"model        {name}")
    for key, value in cfg.to_dict().items():
        if key != "kernels":
            print(f"  {key + ' ':<16}{value}{_what_it_means(cfg, key, value)}")  # a 16-letter key keeps a space
    if args.weights and reward:  # its LM head is never used (a Hugging Face classifier's is only stood in)
        head = model.out_head  # its bias too: a GPT-J or Phi classifier's is a stand-in, zeros
        n = sum(p.numel() for p in reward.parameters()) - (0 if cfg.tie_weights else head.weight.numel()) \
            - (0 if head.bias is None else head.bias.numel())
        print(f"parameters   {n:,} ({n / 1e6:.1f}M, without an LM head)")
        print(f"reward model a scalar head Linear({cfg.n_embd}, 1) on this backbone: one score per sequence, read at "
              "its last token")
    else:
        # a quantized head (model/quant.py) is a copy of its own, even of a tied embedding
        quantized_head = args.weights and getattr(model, "quantized_head", False)
        head = model.quantized if quantized_head else "tied" if cfg.tie_weights else "untied"
        print(f"parameters   {n:,} ({n / 1e6:.1f}M, {head} LM head)")
    if args.weights and getattr(model, "quantized", None):
        from tritongpt.model.gpt import safetensors_metadata
        from tritongpt.model.quant import QUANTIZED_FROM, QuantLinear, linear_bytes

        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        q = sum(m.in_features * m.out_features for m in layers)
        b = sum(m.bias.numel() for m in layers if m.bias is not None)  # buffers too: not among the parameters
        made = "QLoRA: --quantize with --lora-rank" if model.config.lora_rank else "`tritongpt quantize`"
        if getattr(model, "quantized_from", None):
            # a GPTQ/AWQ/bitsandbytes folder read kept quantized, or our file saved from one (its quantized_from)
            own = QUANTIZED_FROM[model.quantized_from]
            made = (f"QLoRA: --lora-rank on its --init {'file' if own == 'GGUF' else 'folder'}'s own {own} "
                    "quantization" if model.config.lora_rank
                    else f"a Hugging Face {own} folder's own quantization" if model.quantized_from != "gguf" else
                    "a GGUF file's own Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks, the embedding and LM head float")
        file = resolve_checkpoint(args.weights)
        state = file.parent / "state.pt"  # a run's: sft --lora-rank on a GPTQ/AWQ folder records its quantization
        own = load_state(file.parent, mmap=True).get("args", {}).get("init_quantized") \
            if model.config.lora_rank and state.is_file() else None
        if own:  # (a .gguf --init is a file, not a folder)
            where = "file" if own.startswith("gguf ") else "folder"
            made = f"QLoRA: --lora-rank on its --init {where}'s own {own.upper()} quantization"
        meta = safetensors_metadata(file) if file.suffix == ".safetensors" else {}
        if meta.get("quantized_method") == "gptq":  # (files from before the method was recorded: round-to-nearest)
            made += (f", GPTQ on {meta.get('quantized_calibration', 'its calibration text')}"
                     + gptq_options(meta, model.quantized))
        elif meta.get("quantized_method") == "awq":
            made += f", AWQ on {meta.get('quantized_calibration', 'its calibration text')}{awq_options(meta)}"
        elif meta.get("quantized_method") == "rtn":
            made += ", rounded to nearest"
        size = model.quantized_group_size  # (int8's where a GPTQ 8-bit folder's group scales: Int8Linear.group_size)
        how = (f"int4 with an fp32 scale and offset a group of {size} inputs" if model.quantized == "int4" else
               f"int8 with an fp32 scale a group of {size} inputs" if size else "int8 with an fp32 scale a row")
        # act-order GPTQ layers (desc_act) hold their inputs sorted by group and gather x's columns into that order
        # before each matmul: the file's in_perm, which a reader of the file must know of
        ordered = sum(getattr(m, "in_perm", None) is not None for m in layers)
        other = getattr(model, "quantized_layers", None)  # (a mixed GGUF file's: model/quant.py mixed_layout)
        if other:
            how += "; " + ", ".join(f"{sum(lg == x for lg in other.values())} of them {x[0]} with an fp32 scale"
                                    + (" and offset" if x[0] == "int4" else "") + f" a group of {x[1]} inputs"
                                    for x in sorted(set(other.values())))
        if ordered:
            how += (f", {ordered} of them act-order (GPTQ's desc_act: each gathers its inputs into its groups' order "
                    "first, its in_perm)")
        print(f"quantized    {model.quantized}: {model.quantized_linears} matrices ({q:,} weights and {b:,} biases, "
              f"the parameters above without them) as {how}, "
              f"{linear_bytes(model) / 2**20:,.1f} MiB as the matmuls read them ({made})")
    if args.weights:
        from tritongpt.train.common import saved_model_config

        saved = saved_model_config(resolve_checkpoint(args.weights))
        if saved.get("lora_rank"):  # the config above is the merged model everything but training loads
            qlora = getattr(model, "quantized", None) and model.config.lora_rank  # (loaded unmerged: QLoRA's)
            print(f"lora         rank {saved['lora_rank']}, alpha {saved.get('lora_alpha'):g} on "
                  f"{saved.get('lora_targets')}: the file holds the frozen weights and the update; "
                  + ("the updates run beside the quantized matrices (export merges them into a float model)" if qlora
                     else "used merged (shown above)"))
        from tritongpt.train.gpt2_weights import adapter_folder

        if adapter_folder(args.weights) is not None:
            base = read_json_object(adapter_folder(args.weights) / "adapter_config.json").get("base_model_name_or_path")
            print(f"adapter      a peft LoRA adapter on {base}: used merged into it (shown above)")
    if args.weights:
        for line in run_lines(args.weights):
            print(line)
    print(f"torch        {torch.__version__}")
    try:
        import triton

        triton_msg = f"{triton.__version__}" + (" (interpreter: CPU tensors)" if triton_interpreting() else "")
    except ImportError:
        triton_msg = "not installed (reference path only)"
    print(f"triton       {triton_msg}")
    if torch.cuda.is_available():
        print(f"cuda         yes: {torch.cuda.get_device_name(0)}")
    else:
        print("cuda         no (Triton path runs through the interpreter, slowly)")
    return 0


def _has_chat_template(tokenizer_path) -> bool:
    """Whether a run's saved tokenizer keeps a chat template (its chats were rendered in it)."""
    from tritongpt.train.tokenizer import load_tokenizer

    try:
        return getattr(load_tokenizer(tokenizer_path), "chat_template", None) is not None
    except UserError:
        return False


def _prompts_line(fmt: str, tok) -> str:
    own = fmt == "chat" and tok is not None and _has_chat_template(tok)
    return (f"prompts      {fmt} template" + (", the model's own (its tokenizer's chat_template)" if own else "")
            + " (what `tritongpt chat` prompts it with)")


def run_lines(weights) -> list:
    """What a checkpoint's training state says of its run (trainer, step, precision, data, the
    tokenizer saved with it), for `info --weights`; a bare weight file has none."""
    from tritongpt.train.common import load_state, resolve_checkpoint
    from tritongpt.train.loop import lm_loss_text
    from tritongpt.train.tokenizer import saved_tokenizer_path

    ckpt = resolve_checkpoint(weights).parent
    tok = saved_tokenizer_path(weights)
    lines = [f"tokenizer    {tok if tok is not None else '- (none saved with it: pass --tokenizer where it is used)'}"]
    if not (ckpt / "state.pt").is_file():
        from tritongpt.train.chat import EXPORTED_FORMAT, exported_config, run_template

        # a merge's file and an export's config.json keep the format too, and chat prompts in it
        fmt = run_template(weights)
        lines = ([_prompts_line(fmt, tok)] if fmt else []) + lines
        recipe = merge_recipe(resolve_checkpoint(weights))
        if recipe is not None:  # `tritongpt merge`'s output: its models and method, in the file
            return [f"run          - (a merge: {recipe})"] + lines
        if EXPORTED_FORMAT in exported_config(ckpt):  # `tritongpt export`'s folder: the run's state is not in it
            return ["run          - (a `tritongpt export` folder: weights, config.json and tokenizer files; no "
                    "training state)"] + lines
        return [f"run          - (no training state beside {ckpt.name}: a weights file only)"] + lines
    state = load_state(ckpt, mmap=True)
    a = state.get("args", {})
    init = f"; from --init {a['init']}" if a.get("init") else ""
    world = state.get("world_size", 1)
    # RLHF counts iterations of --iterations; the Trainer's runs count steps of --max-steps
    unit, limit = ("iteration", "iterations") if "iteration" in state else ("step", "max_steps")
    lines.insert(0, f"run          {state.get('name', '?')}, {unit} {state.get(unit, '?')} of {a.get(limit, '?')} "
                    f"({str(state.get('precision', '?')).removeprefix('torch.')}, kernels {state.get('kernels', '?')}, "
                    f"{world} process{'es' if world != 1 else ''}){init}")
    if state.get("prompt_format"):
        lines.insert(1, _prompts_line(state["prompt_format"], tok))
    options = lm_loss_text(a)
    if options:  # the run's objective was not the plain cross-entropy (--label-smoothing, --z-loss)
        lines.insert(1, f"objective    cross-entropy with {options}")
    data = state.get("data")
    data = data[0] if isinstance(data, list) and data else data
    if isinstance(data, dict) and "train_tokens" in data:
        lines.insert(1, f"data         {data.get('source')}: {data['train_tokens']:,} training tokens, "
                        f"{data.get('block_size')}-token blocks")
    return lines


def merge_recipe(weights_file) -> str | None:
    """How `tritongpt merge` made a weights file (its metadata's "merge"), in a line; None for any other file."""
    import json

    from tritongpt.model.gpt import safetensors_metadata

    if weights_file.suffix != ".safetensors":
        return None
    try:
        r = json.loads(safetensors_metadata(weights_file).get("merge", "null"))
    except ValueError:
        return None
    if not isinstance(r, dict):
        return None
    opts = [f"{k} {r[k]}" for k in ("base", "coefficients", "t", "density", "scale")
            if r.get(k) is not None and not (k == "scale" and r[k] == 1.0)]  # (the default scale: none)
    return f"{r.get('method')} of {', '.join(map(str, r.get('models', [])))}" + (f" ({'; '.join(opts)})" * bool(opts))


def check_generation_args(args):
    """The flags `generate` and `chat` share, checked before any model is built."""
    from tritongpt.train.common import check_seed
    from tritongpt.train.generate import check_sampling

    check_model_source(args)
    check_sampling(args.temperature, args.top_k, args.top_p, flags=True, **sampling_controls(args))
    check_seed(args.seed)


def check_model_source(args):
    """--pretrained against --weights and --model (generate, chat, serve): one source, a name it downloads."""
    if args.pretrained:
        from tritongpt.train import gpt2_weights, gpt_neo_weights

        if args.weights:
            raise UserError("--pretrained downloads published weights and --weights loads a file: pass one of them")
        args.model = args.model or "gpt2-small"
        names = [*gpt2_weights.HUB_REPOS, *gpt_neo_weights.HUB_REPOS]
        if args.model not in names:
            raise UserError(f"--pretrained downloads GPT-2 or GPT-Neo by --model name ({'|'.join(names)}), "
                            f"not {args.model!r}")


def sampling_controls(args) -> dict:
    """The sampling flags beyond temperature, top-k and top-p, as check_sampling and generate() name them (one list
    for generate, chat and their checks)."""
    return dict(min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                presence_penalty=args.presence_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                typical_p=args.typical_p, epsilon_cutoff=args.epsilon_cutoff, eta_cutoff=args.eta_cutoff,
                top_n_sigma=args.top_n_sigma)


def add_mask_args(p):
    """generate's and chat's vLLM allowed_token_ids and bad_words flags (serve's fields)."""
    p.add_argument("--allowed-token-ids", default=None, metavar="IDS",
                   help="draw only these token ids, comma-separated (or @FILE: ids separated by commas or "
                        "whitespace), as vLLM's allowed_token_ids; before the penalties and the other sampling flags")
    p.add_argument("--bad-words", action="append", default=None, metavar="WORD",
                   help="never draw WORD's tokens in a row, as vLLM's bad_words: the word tokenized as it is and "
                        "with a leading space (where that gives as many tokens), its last token banned where its "
                        "others end the generated text; repeat it for several")


def mask_flags(args) -> tuple:
    """--allowed-token-ids' ids (comma- or whitespace-separated, or @FILE's) and how a refusal names them, (None, None)
    where not given; --bad-words' words checked not empty. Read before the model loads (a typo refused at once):
    token_masks checks them against its vocabulary after."""
    if args.bad_words is not None and not all(w.strip() for w in args.bad_words):
        raise UserError("--bad-words takes a word of text, not an empty one")
    text = args.allowed_token_ids
    if text is None:
        return None, None
    where = "--allowed-token-ids"
    if text.startswith("@"):
        try:  # (read_text_file's refusals: a missing file, a folder, bytes not UTF-8)
            text, where = read_text_file(text[1:]), f"--allowed-token-ids {text[1:]}"
        except UserError as e:
            raise UserError(f"--allowed-token-ids {text}: {e}") from None
    items = text.replace(",", " ").split()
    bad = next((t for t in items if not t.isdecimal()), None)
    if bad is not None or not items:
        raise UserError(f"{where}: " + (f"{bad!r} is not a token id" if bad is not None else "no token ids")
                        + " (give integers >= 0, comma-separated, or @FILE)")
    return [int(t) for t in items], where


def token_masks(args, tok, vocab: int, flags: tuple) -> dict:
    """--allowed-token-ids (flags: mask_flags') and --bad-words as generate()'s allowed_token_ids and bad_words
    (tokenized by tok as vLLM's update_from_tokenizer), each id checked against the model's vocab tokens."""
    from tritongpt.train.generate import bad_words_tokens

    allowed, where = flags
    if allowed is not None and max(allowed) >= vocab:
        raise UserError(f"{where} has token id {max(allowed)}: the model's tokens are 0..{vocab - 1}")
    words = None
    if args.bad_words is not None:
        words = bad_words_tokens(lambda w: tok.encode(w, allowed_special="all"), args.bad_words)
        if max(max(ids) for ids in words) >= vocab:
            raise UserError(f"--bad-words tokenize to token id {max(max(ids) for ids in words)}: the model's tokens "
                            f"are 0..{vocab - 1}")
    return dict(allowed_token_ids=allowed, bad_words=words)


def check_masks_end(masks: dict, end, spec, whose: str = "--structured-outputs'") -> None:
    """spec's grammar (whose: how the error names it) ends the text with its end token (end: generate's end of text,
    chat's end of turn): a mask that leaves it out (token_masks') would leave every text reaching the grammar's end
    no token to draw, an error only then, mid-text. Refused by flag before any text (generate.masked_ends)."""
    from tritongpt.train.generate import masked_ends

    if spec is None or end is None:
        return
    masked = masked_ends([end], masks["allowed_token_ids"], masks["bad_words"], lambda n: "--" + n.replace("_", "-"),
                         whose)
    if masked is not None:
        raise UserError(masked[1])


def load_generation_model(args):
    """(model in eval mode on its device with --kernels, tokenizer, device, dtype, vocab_limit) from
    --weights, --pretrained or a random --model; vocab_limit: the tokenizer's size where the model
    has more rows (only its ids are drawn), else None."""
    import torch

    from tritongpt.model.config import get_config
    from tritongpt.model.gpt import GPTModel
    from tritongpt.train.common import note_slow_kernels, pick_device, pick_dtype
    from tritongpt.train.sft import pick_tokenizer

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    if args.weights:
        from tritongpt.train.gpt2_weights import load_checkpoint

        # --model only when given: it names the heads of a GPT-2 file without its config.json
        model = load_checkpoint(args.weights, args.model, quantized_ok=True)
    elif args.pretrained:
        from tritongpt.train.gpt2_weights import load_pretrained

        model = load_pretrained(args.model)
    else:
        name = args.model or "tiny"
        config = get_config(name)  # an unknown name refused before the note calls it a model
        note(f"{name} has random weights (pass --weights for a trained model)")
        model = GPTModel(config)
    quantize(model, args, device)  # before the move: the float matrices go to the device one at a time
    model.to(device).eval()
    model.set_kernels(args.kernels)
    note_slow_kernels([model], device)  # the trainers' note: generate, chat and serve wait on the interpreter too
    # --pretrained: the name's tokenizer (a GPT-Neo's files, fetched with its weights)
    tok = pick_tokenizer(args.tokenizer, args.weights or (args.model if args.pretrained else None),
                         model.config.vocab_size)
    limit = None
    if tok.vocab_size < model.config.vocab_size:
        limit = tok.vocab_size
        note(f"the tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}: "
             f"only the tokenizer's ids are drawn")
    return model, tok, device, dtype, limit


def encode_generate_prompt(tok, prompt: str, allow_special: bool, where: str = "the prompt") -> tuple:
    """(lead, ids): a prompt's ids as `generate` encodes it, lead the BOS a Gemma's or Llama's own tokenizer starts
    every text with (not printed), or [] (where: what an error calls the prompt)."""
    from tritongpt.train.formats import with_bos
    from tritongpt.train.tokenizer import DisallowedSpecialToken

    try:
        ids = tok.encode(prompt, allowed_special="all" if allow_special else "none_raise")
    except DisallowedSpecialToken as e:
        raise UserError(f"{where} contains {e.token}: pass --allow-special to encode it as the "
                        "special token") from None
    if not ids:
        raise UserError(f"{where} is empty" + ": pass --prompt (or --prompt-file) with some text" *
                        (where == "the prompt"))
    return with_bos(tok, ids)[:-len(ids)], ids


def first_end(new, ends):
    """The index in new (a row's new ids) of its first end token (ends: a set of ids), or None: where its text ends
    (a row that ended early is padded with more end tokens after it)."""
    return next((j for j, t in enumerate(new) if t in ends), None)


def model_end_ids(args, tok, model, limit, stop_id) -> list:
    """The end tokens of the model's generation config (hf_tokenizer.generation_end_ids: generation_config.json's
    eos_token_id, else config.json's) other than stop_id (the tokenizer's EOS, or a chat's end of turn): every
    command that generates from a model folder (generate, its --num-beams and --prompts, chat) ends a text on them
    too, as serve does (vLLM stops on them beside the EOS, transformers' generate on them). Its folder's alone
    (serve.model_folder, as serve's --generation-config auto reads it: a run's checkpoint has none). limit: the
    tokenizer's size where the model has more rows (load_generation_model's)."""
    from tritongpt.train.hf_tokenizer import generation_end_ids
    from tritongpt.train.serve import model_folder

    folder = model_folder(args, tok)
    ends = generation_end_ids(folder, model.config.vocab_size, limit)[0] if folder is not None else []
    return [t for t in ends if t != stop_id]


def cmd_generate(args):
    import torch

    from tritongpt.train.common import autocast
    from tritongpt.train.generate import generate
    from tritongpt.train.structured import Grammars, spec_from_flag
    from tritongpt.train.tokenizer import eot_or_none

    if args.prompts is not None:  # vLLM's offline LLM.generate: every prompt of a file through the engine
        from tritongpt.train.batch_generate import cmd_generate_prompts

        return cmd_generate_prompts(args)
    batch_flags = [f for f, v in (("--out", args.out), ("--max-batch", args.max_batch),
                                  ("--kv-cache-pages", args.kv_cache_pages), ("--kv-page-size", args.kv_page_size),
                                  ("--enable-prefix-caching", args.enable_prefix_caching or None),
                                  ("--max-prefill-tokens", args.max_prefill_tokens),
                                  ("--enable-lora", args.enable_lora or None), ("--lora-modules", args.lora_modules),
                                  ("--max-lora-rank", args.max_lora_rank), ("--max-loras", args.max_loras))
                   if v is not None]  # (every flag of serve's add_engine_args and add_lora_args: a test reads them)
    if batch_flags:
        raise UserError(f"{batch_flags[0]} is a --prompts FILE setting (generation over a file of prompts): pass "
                        "--prompts, or leave it out")

    beams = check_beam_args(args)  # (first: it sets --temperature's default)
    check_generation_args(args)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.stream and args.num_samples > 1:
        raise UserError("--stream prints one text as it is drawn: it takes --num-samples 1")
    drafts = [f for f, v in (("--draft", args.draft), ("--prompt-lookup", args.prompt_lookup),
                             ("--prediction", args.prediction)) if v is not None]
    if len(drafts) > 1:
        raise UserError(f"{drafts[0]} and {drafts[1]} are two drafts (a model, the text's own n-grams, a predicted "
                        "text): pass one")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise UserError(f"--prompt-lookup (the longest n-gram looked up) must be a positive integer, "
                        f"got {args.prompt_lookup}")
    if args.draft_tokens is not None and not drafts:
        raise UserError("--draft-tokens is how many tokens the --draft model proposes a step (--prompt-lookup and "
                        "--prediction at most): pass --draft, --prompt-lookup or --prediction")
    spec = None if args.structured_outputs is None else spec_from_flag(args.structured_outputs)
    if args.cuda_graphs and (drafts or beams is not None):
        raise UserError("--cuda-graphs replays a one-token decode step: it does not take --draft, --prompt-lookup, "
                        "--prediction or --num-beams")
    predicted = None if args.prediction is None else read_text_file(args.prediction)
    stops = stop_strings(args.stop)
    prompt = args.prompt if args.prompt is not None else read_text_file(args.prompt_file)
    flags = mask_flags(args)
    model, tok, device, dtype, limit = load_generation_model(args)
    check_cuda_graphs(args, device, model)
    draft = load_draft(args, model, tok, device) if args.draft else None
    masks = token_masks(args, tok, limit or model.config.vocab_size, flags)
    check_masks_end(masks, eot_or_none(tok), spec)
    lead, ids = encode_generate_prompt(tok, prompt, args.allow_special)
    if len(lead + ids) > model.config.context_length:  # a full window is fine: it predicts the next token
        raise UserError(f"prompt is {len(lead + ids)} tokens; the model's context is {model.config.context_length}")
    idx = torch.tensor([lead + ids] * args.num_samples, dtype=torch.long, device=device)  # one batch
    eot = eot_or_none(tok)
    # the model's generation config's end tokens end a text too, beside the tokenizer's EOS: transformers' generate
    # stops on those (the tokenizer's EOS aside), vLLM on both, so a tokenizer_config.json naming another EOS than
    # config.json's or generation_config.json's eos_token_id ends where either would
    ends = model_end_ids(args, tok, model, limit, eot)
    if beams is not None:
        with autocast(device, dtype):
            return print_beams(model, tok, idx, len(lead), args.max_new_tokens, beams, eot, limit,
                               kv_cache_dtype=args.kv_cache_dtype, stop_token_ids=ends, **sampling_controls(args))
    # transformers' defaults: 10 tokens a prompt lookup (prompt_lookup_num_tokens)
    num_draft = (4 if args.draft else 10) if args.draft_tokens is None else args.draft_tokens
    if args.prompt_lookup is not None:
        from tritongpt.train.generate import PromptLookup

        draft = PromptLookup(args.prompt_lookup)
    if predicted is not None:
        from tritongpt.train.generate import Prediction

        draft = Prediction(tok.encode(predicted, allowed_special="all" if args.allow_special else "none"))
    if draft is not None:
        from tritongpt.train.generate import check_draft

        check_draft(model, draft, idx, args.max_new_tokens, num_draft, flags=True)
    stats = {}
    gen = torch.Generator(device=device).manual_seed(args.seed)
    guide = None if spec is None else Grammars.of(tok, limit or model.config.vocab_size).guide(spec)
    stream = TextStream(tok, ids, eot, stops, ends) if args.stream else None
    prompt_text = tok.decode(ids)
    end_set = {eot, *ends}

    # which rows' new text holds a stop string: Choices.stopped (no end token of its own: the text is all the new
    # ids', as continuation() gives it), which grows each row's text rather than decoding the whole row each step
    stopped = Choices(tok, ids, stops, None, lead=len(lead)).stopped if stops else None

    with autocast(device, dtype):  # the weights stay fp32; sampling reads fp32 probabilities
        out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_id=eot, generator=gen, vocab_limit=limit, on_token=stream,
                       stop=stopped, draft=draft, num_draft_tokens=num_draft, stats=stats,
                       cuda_graph=args.cuda_graphs, kv_cache_dtype=args.kv_cache_dtype, guide=guide,
                       stop_token_ids=ends or None, **sampling_controls(args), **masks).tolist()
    if stream:
        stream.close()
    if draft is not None:
        draft_note(stats, args.num_samples, "prompt lookup decoding" if args.prompt_lookup else
                   "the prediction" if predicted is not None else "speculative decoding")
    for i, row in enumerate(out):
        row = row[len(lead):]
        new = row[len(ids):]
        # a row that ended early is padded with more markers after its first
        ended = first_end(new, end_set)
        if ended is not None:
            new, marker = new[:ended], new[ended]
        # (a row a stop string ended ends with the token that completed it: its text the last step's, vLLM's window)
        since = len(continuation(tok, ids, new[:-1], prompt_text).rstrip("\ufffd")) if stops and new else None
        text, cut = cut_at_stop(continuation(tok, ids, new, prompt_text), stops, since=since)
        if i:
            print(SAMPLE_SEPARATOR)
        if not stream:
            # the text, without the marker that ended it (as Hugging Face's text-generation pipeline)
            print(prompt_text + text if cut else tok.decode(ids + new))
        which = f"sample {i + 1}: " if args.num_samples > 1 else ""
        if cut:
            note(f"{which}the text stopped at --stop {cut!r}")
        elif ended is not None:
            note(f"{which}the model ended the text ({tok.decode([marker])}) after {len(new)} new tokens")
    return 0


def add_beam_args(p):
    """generate's beam search flags (transformers' generate names, its defaults)."""
    p.add_argument("--num-beams", type=int, default=1, metavar="N",
                   help="beam search with N beams, as transformers' generate(num_beams=N): the N likeliest texts "
                        "kept each step, deterministic (default %(default)s: off)")
    p.add_argument("--length-penalty", type=float, default=None, metavar="A",
                   help="a finished beam scores its log-probability / (new tokens ** A): A > 0 favours longer texts, "
                        "A < 0 shorter ones (default 1.0, as transformers')")
    p.add_argument("--early-stopping", default=None, choices=["true", "false", "never"],
                   help="when beam search ends, as transformers' early_stopping: true once N beams have finished, "
                        "false (default) once the best running beam at its length cannot beat them, never the same "
                        "at the length it may still reach")
    p.add_argument("--num-return-sequences", type=int, default=None, metavar="R",
                   help="print the R best beams, best first, with their scores (at most --num-beams; default 1)")


def check_beam_args(args):
    """--num-beams and its flags, checked before any model is built; sets --temperature's default (0.8, 0 with
    --num-beams). Returns beam_search's settings, or None without beam search."""
    from tritongpt.train.beam_search import check_beam_search

    given = [flag for flag, value in (("--length-penalty", args.length_penalty),
                                      ("--early-stopping", args.early_stopping),
                                      ("--num-return-sequences", args.num_return_sequences)) if value is not None]
    if args.num_beams == 1:
        if given:
            raise UserError(f"{given[0]} is a beam search setting: pass --num-beams N (N > 1)")
        if args.temperature is None:
            args.temperature = GENERATE_TEMPERATURE
        return None
    if args.temperature is None:
        args.temperature = 0.0
    beams = dict(num_beams=args.num_beams, length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
                 early_stopping={"true": True, "false": False, None: False}.get(args.early_stopping, "never"),
                 num_return_sequences=1 if args.num_return_sequences is None else args.num_return_sequences)
    check_beam_search(**beams, flags=True)
    # transformers' beam search with do_sample draws the beams; ours is deterministic, so sampling flags are refused
    # rather than silently ignored, as are the flags generate()'s other paths alone implement
    refused = [("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
               ("--min-p", args.min_p), ("--typical-p", args.typical_p), ("--epsilon-cutoff", args.epsilon_cutoff),
               ("--eta-cutoff", args.eta_cutoff), ("--top-n-sigma", args.top_n_sigma),
               ("--frequency-penalty", args.frequency_penalty),
               ("--presence-penalty", args.presence_penalty), ("--draft", args.draft),
               ("--draft-tokens", args.draft_tokens), ("--prompt-lookup", args.prompt_lookup is not None),
               ("--prediction", getattr(args, "prediction", None)), ("--stop", args.stop), ("--stream", args.stream),
               ("--num-samples", args.num_samples != 1), ("--structured-outputs", args.structured_outputs)]
    for flag, value in refused:
        if value:
            raise UserError(f"--num-beams (beam search) does not take {flag}: it is deterministic, without "
                            "sampling, stop strings, streaming or a draft (--num-return-sequences R prints R beams)")
    for flag, value in (("--allowed-token-ids", args.allowed_token_ids), ("--bad-words", args.bad_words)):
        if value is not None:  # (serve refuses allowed_token_ids and bad_words with use_beam_search too)
            raise UserError(f"--num-beams (beam search) does not take {flag}: the search scores the model's "
                            "log-probabilities unmasked")
    return beams


def print_beams(model, tok, idx, lead: int, max_new_tokens: int, beams: dict, eot, limit, kv_cache_dtype="auto",
                stop_token_ids=(), **controls) -> int:
    """generate --num-beams: the best beams' texts (as generate prints a sample) and their scores on stderr.
    stop_token_ids: the other ids that end a beam (model_end_ids')."""
    from tritongpt.train.beam_search import beam_search, check_return_sequences

    T, ctx = idx.size(1), model.config.context_length
    if max_new_tokens and T + max_new_tokens - 1 > ctx:
        raise UserError(f"--num-beams keeps the text within the model's context: prompt {T} + --max-new-tokens "
                        f"{max_new_tokens} - 1 > context length {ctx}")
    check_return_sequences(beams["num_return_sequences"], min(limit or model.config.vocab_size,
                                                              model.config.vocab_size), max_new_tokens, eot, flags=True,
                           stop_token_ids=stop_token_ids)
    out, scores = beam_search(model, idx, max_new_tokens, **beams, eos_id=eot, vocab_limit=limit,
                              repetition_penalty=controls["repetition_penalty"],
                              no_repeat_ngram_size=controls["no_repeat_ngram_size"], kv_cache_dtype=kv_cache_dtype,
                              stop_token_ids=list(stop_token_ids) or None)
    ids, ends = idx[0, lead:].tolist(), {eot, *stop_token_ids} - {None}
    for i, (row, score) in enumerate(zip(out.tolist(), scores.tolist())):
        new = row[T:]
        ended = first_end(new, ends)  # (a shorter beam is padded with an end)
        if ended is not None:
            new, marker = new[:ended], new[ended]
        if i:
            print(SAMPLE_SEPARATOR)
        print(tok.decode(ids + new))
        end = f", the model ended the text ({tok.decode([marker])}) after {len(new)} new tokens" \
            if ended is not None else ""
        note(f"beam {i + 1}: score {score:.6f}{end}")
    return 0


def add_draft_args(p, extra: str = "", lookup: bool = False):
    """generate's and chat's speculative decoding flags (lookup: generate's --prompt-lookup too)."""
    p.add_argument("--draft", default=None, metavar="W",
                   help="speculative decoding: a smaller model of the same tokenizer (taken as --weights is) "
                        "proposes tokens that the model checks several at a time; the same text greedy, the same "
                        f"distribution sampled{extra}")
    if lookup:
        p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                       help="prompt lookup decoding (Saxena 2023, transformers' prompt_lookup_num_tokens): "
                            "speculative decoding with no draft model, proposing the tokens that followed the most "
                            "recent earlier occurrence of the text's last N-gram (N down to 1; transformers' "
                            "max_matching_ngram_size, 2 by default there); the same text greedy, the same "
                            "distribution sampled")
        p.add_argument("--prediction", default=None, metavar="FILE",
                       help="a predicted output (OpenAI's Predicted Outputs): the text the answer is expected to "
                            "repeat mostly (a file being edited), whose tokens are proposed where the answer stands "
                            "in it and checked as --prompt-lookup's are; the same text greedy, the same "
                            "distribution sampled")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="tokens the --draft model proposes a step (default 4)" +
                        (" or --prompt-lookup or --prediction at most (default 10, as transformers')" if lookup
                         else ""))


def draft_note(stats: dict, rows: int = 1, what: str = "speculative decoding") -> None:
    """The acceptance a speculative run had (generate()'s stats, or their sums over chat's replies, one row):
    with several rows, generate()'s mean a forward and row (rows that ended leave the count)."""
    if stats.get("target_forwards"):
        if rows == 1:
            note(f"{what}: {stats['accepted'] / stats['target_forwards']:.2f} draft tokens accepted "
                 f"per forward of the model ({stats['accepted']} of {stats['drafted']} proposed, "
                 f"{stats['target_forwards']} forwards)")
        else:
            # every row keeps the m draft tokens the live row that kept fewest accepted, and one token more
            note(f"{what}: {stats['accepted_per_forward']:.2f} draft tokens kept per forward of "
                 f"the model and sample, the fewest a sample accepted; each forward gave a sample one more "
                 f"({stats['accepted']} of {stats['drafted']} proposed over {rows} samples, "
                 f"{stats['target_forwards']} forwards)")


def load_draft(args, model, tok, device, path=None, what="--draft"):
    """--draft's model (or `path`, `what` naming it: serve --speculative-config's), loaded as --weights is, on the
    model's device with --kernels: refused by name when its vocabulary or the tokenizer saved with it is not the
    model's (its ids would mean other text)."""
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.sft import load_quietly
    from tritongpt.train.tokenizer import same_ids, saved_tokenizer_path

    path = args.draft if path is None else path
    draft = load_checkpoint(path, quantized_ok=True)
    if draft.config.vocab_size != model.config.vocab_size:
        raise UserError(f"{what} {path} has a vocabulary of {draft.config.vocab_size} tokens, the model "
                        f"{model.config.vocab_size}: a draft must share the model's tokenizer")
    saved = saved_tokenizer_path(path)
    other = None if saved is None else load_quietly(saved)
    # the same size can hold other ids (the comparison rlhf's --reward makes; the EOS aside)
    if other is not None and not same_ids(other, tok):
        raise UserError(f"the tokenizer saved with {what} {path} ({saved}) is not the model's: its ids "
                        "mean other text (pass a draft trained on the model's tokenizer)")
    quantize(draft, args, device, "the draft")  # --quantize: the draft as the model (gpt-fast quantizes both)
    draft.to(device).eval()
    draft.set_kernels(args.kernels)
    return draft


def continuation(tok, ids, new, prompt=None) -> str:
    """The text `new` adds after the prompt `ids` (prompt: its decoding, where the caller has it), as decoding the
    whole row spells it: a SentencePiece decoder drops the space of a text's first word, which decoding `new`
    alone would lose."""
    prompt, whole = tok.decode(ids) if prompt is None else prompt, tok.decode(ids + new)
    return whole[len(prompt):] if whole.startswith(prompt) else tok.decode(new)


class ContinuationStream:
    """continuation()'s text streamed: write(new ids) hands out what continuation(tok, ids, all new ids so far) adds,
    less what later ids may change (the tokenizer's stream_decoder, read after the prompt). A prompt that ends in a
    cut character (token ids sent as the prompt) holds text its stream decoder has not handed out: continuation
    counts it the prompt's (its U+FFFD) where the new ids do not complete it, and decodes the new ids alone where
    they do; until the new text says which, nothing is handed out."""

    def __init__(self, tok, ids):
        self.tok, self.after = tok, tok.stream_decoder()  # after: the prompt's text, then the new text
        self.held = tok.decode(ids)[len(self.after.write(ids)):]  # the prompt's text not handed out
        self.alone = tok.stream_decoder() if self.held else None  # the new ids decoded alone (continuation's else)
        self.seen, self.seen_alone = "", ""  # what each handed out since the prompt, while undecided

    def write(self, ids) -> str:
        if self.alone is None:  # decided (or nothing held): the new text as decoding the whole row gives it
            return self.after.write(ids)
        return self._decide(self.after.write(ids), self.alone.write(ids))

    def flush(self) -> str:
        return self.after.flush() if self.alone is None else self._decide(self.after.flush(), self.alone.flush(),
                                                                          True)

    def _decide(self, after: str, alone: str, final: bool = False) -> str:
        self.seen, self.seen_alone = self.seen + after, self.seen_alone + alone
        if self.seen.startswith(self.held):  # the whole row starts with the prompt's text: what follows it
            self.alone = None
            return self.seen[len(self.held):]
        if self.held.startswith(self.seen) and not final:
            return ""  # not known yet
        self.after, self.alone = self.alone, None  # the new ids complete the prompt's character: decoded alone
        return self.seen_alone


def stop_strings(values) -> list:
    """--stop's texts, backslash escapes read (a shell passes "\\n" as two characters); an empty one is refused."""
    stops = []
    for value in values or []:
        try:
            text = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError as e:
            raise UserError(f"--stop {value!r}: a broken backslash escape ({e.reason})") from None
        if not text:
            raise UserError("--stop '': an empty text would stop every sample at once")
        stops.append(text)
    return stops


def cut_at_stop(text: str, stops, after: int = 0, keep: bool = False, since: int | None = None) -> tuple:
    """(text before the first stop string in it, that stop) or (text, None). after: only a stop string that ends past
    that many characters counts (vLLM's min_tokens: not in the text of the first min_tokens tokens); keep: the text
    up to the stop string's end instead (vLLM's include_stop_str_in_output). A U+FFFD the text ends in is not
    searched: a character cut by the last token, which the next may complete (vLLM's detokenizer holds such text
    back, its stop strings never see it). Which stop string is first: vLLM's check_stop_strings searches each step's
    new text for the stop strings in the request's order and takes the first it finds there, so of those ending
    past `since` (the searched text's length before the step that drew the last token, where the caller knows it)
    the one listed first, whatever its start; before that, the one that ends first (a step a character, where
    the steps are not known), two ending together by the request's order."""
    whole = text.rstrip("\ufffd")
    since = len(whole) if since is None else since
    hits = [(min(at + len(s), since + 1), k, at) for k, s in enumerate(stops)
            for at in [whole.find(s, max(after - len(s) + 1, 0))] if at >= 0]
    if not hits:
        return text, None
    _, k, at = min(hits)
    return text[:at + len(stops[k]) if keep else at], stops[k]


class Choices:
    """One prompt's rows as serve's choices are made (and `generate --prompts`' records): each row's new text up to
    the end token (stop_id) and cut at the first stop string, its finish reason ("stop": a stop string or the end
    token; "length": the budget) and its completion tokens (at a stop string, those drawn when the text first held
    it). stopped: generate()'s and Engine.submit's stop rule for them. lead: ids the rows hold before the prompt's
    (`generate`'s BOS, not part of the text). vLLM's extras: stop_token_ids end a row too (their text not in it
    unless include_stop), ignore_eos: stop_id ends none (its spelling is text), min_tokens: a stop string counts
    only where it ends past the text of the first min_tokens tokens, include_stop: the text keeps the stop string;
    skip_special: a drawn special token (the EOS under ignore_eos) adds no text (vLLM's skip_special_tokens)."""

    def __init__(self, tok, ids, stops, stop_id, lead: int = 0, stop_token_ids=(), ignore_eos: bool = False,
                 min_tokens: int = 0, include_stop: bool = False, skip_special: bool = False):
        self.tok, self.ids, self.stops, self.stop_id = tok, ids, stops, stop_id
        self.prompt_text, self.start = tok.decode(ids), lead + len(ids)
        self.first_stop = {}  # row -> how many new tokens it had drawn when its text first held a stop string
        self.eos_ends = stop_id is not None and not ignore_eos  # (vLLM's stop_reason: None for it)
        self.ends = set(stop_token_ids) | ({stop_id} if self.eos_ends else set())
        # the drawn ids whose text is left out
        self.hidden = set(getattr(tok, "special_tokens", {}).values()) if skip_special else set()
        # the end tokens whose text the answer keeps (the EOS's never: vLLM skips special tokens' text)
        self.shown = set(stop_token_ids) - {stop_id} if include_stop else set()
        self.min_tokens, self.include_stop = min_tokens, include_stop
        # stopped's running text a row (Grown), where decoding the prompt and the new ids each step would cost a
        # decode step of the whole row for every row of the batch (a server's per-step host time): for a
        # byte-level BPETokenizer whose prompt ends on a whole character, where the text of more ids is exactly the
        # text so far and the new bytes', and for an HFTokenizer whose decoder is local (hf_tokenizer.Window) and
        # whose prompt's text no later id changes (GrownText: the last ids' window decoded). Else decoded whole.
        from tritongpt.train.tokenizer import BPETokenizer

        self.grown, self.prompt_window = None, None
        if type(tok).decode is BPETokenizer.decode and isinstance(tok, BPETokenizer):
            probe = Grown()
            probe.decoder.decode(tok.decode_bytes(ids))
            if not probe.decoder.getstate()[0]:
                self.grown = {}
        elif getattr(tok, "incremental", False):
            from tritongpt.train.hf_tokenizer import Window

            window = Window(tok)
            window.ids = list(tok._checked_ids(ids))
            if not ids or window.commit(len(ids), window.text(len(ids))):
                self.grown, self.prompt_window = {}, window

    def end_of(self, new):
        """The index of the token that ends the row's answer in new, or None."""
        return first_end(new, self.ends)

    def text_of(self, new) -> str:
        """The row's new text, up to the token that ends the answer."""
        end = self.end_of(new)
        if end is not None:
            new = new[:end + (new[end] in self.shown)]
        return continuation(self.tok, self.ids, [t for t in new if t not in self.hidden], self.prompt_text)

    def cut(self, new, since: int | None = None) -> tuple:
        """cut_at_stop of the row's new text, as min_tokens and include_stop have it (since: cut_at_stop's)."""
        # (min_tokens' text less its trailing U+FFFDs: a character its last token cut is held back from vLLM's text
        # then, as from a stop string's search, so a stop string it completes later counts)
        after = len(self.text_of(new[:self.min_tokens]).rstrip("\ufffd")) if self.min_tokens and self.stops else 0
        return cut_at_stop(self.text_of(new), self.stops, after, self.include_stop, since)

    def stopped(self, rows):
        import torch

        if self.grown is not None:
            self._grow(rows)
        else:
            for i, r in enumerate(rows.tolist()):
                if i not in self.first_stop and self.cut(r[self.start:])[1] is not None:
                    self.first_stop[i] = len(r) - self.start
        return torch.tensor([i in self.first_stop for i in range(len(rows))])

    def _grow(self, rows):
        """stopped's rows each step without decoding them whole: each live row's ids since its last call read to the
        host (not the whole row) and its text grown by their bytes (Grown), a stop string searched for only where it
        could end in what they added. The same first_stop as cut() on the whole row (tests/test_serve.py compares
        them on random ids)."""
        live = [i for i in range(len(rows)) if i not in self.first_stop]
        if not live or not self.stops:  # (no stop string: cut() finds none)
            return
        length = rows.size(1) - self.start
        for i in live:  # (a row shorter than at its last call is not that row grown: read again whole)
            if i not in self.grown or self.grown[i].count > length:
                self.grown[i] = Grown() if self.prompt_window is None else GrownText(self.prompt_window)
        first = min(self.grown[i].count for i in live)
        hold = max(map(len, self.stops)) - 1
        new = rows[:, self.start + first:].tolist()  # (a slice, not rows[live]: an indexing op costs more here)
        for i in live:
            g, ids = self.grown[i], new[i]
            # cut_at_stop searches the text less its trailing U+FFFDs (a pending byte's, or a committed one a later
            # character may follow): that part only grows, each call's a prefix of the next's. A match in it at the
            # last call was searched for then, with an `after` no larger: only one ending past it can be new, so the
            # search starts len(stop) - 1 before its end (within the tail kept), and none while it has not grown.
            seen = g.stable
            g.add(self, ids[g.count - first:])
            if g.whole > seen and any(g.tail.find(stop, max(g.after - len(stop) + 1, seen - len(stop) + 1, g.base)
                                                  - g.base) >= 0 for stop in self.stops):
                self.first_stop[i] = length
            g.trim(hold)

    def choice(self, i: int, row) -> tuple:
        """Row i (the lead, the prompt's ids and the new ones: a list) -> (text, finish_reason, completion tokens)."""
        return self.ending(i, row)[:3]

    def ending(self, i: int, row) -> tuple:
        """choice's (text, finish_reason, completion tokens) and vLLM's stop_reason: the stop string that cut the
        text, or the stop token id that ended it; None for the EOS (stop_id) or the budget."""
        new = row[self.start:]
        if i in self.first_stop:  # the text up to the step that stopped it, its last token's text vLLM's window
            k = self.first_stop[i]
            text, cut = self.cut(new[:k], len(self.text_of(new[:k - 1]).rstrip("\ufffd")))
            if cut is not None:
                return text, "stop", k, cut
        text, cut = self.cut(new)
        if cut is not None:
            return text, "stop", self.first_stop[i], cut
        end = self.end_of(new)
        if end is not None:  # the end token was drawn too
            return text, "stop", end + 1, None if new[end] == self.stop_id and self.eos_ends else new[end]
        return text, "length", len(new), None


def _kept(grown, rows, t) -> bool:
    """Counts t among a grown row's new ids (Grown's or GrownText's): whether its text is the row's, up to the row's
    first end token (an end token in rows.shown included), the hidden ones left out."""
    grown.count += 1
    if grown.ended:
        return False
    grown.ended = t in rows.ends
    return (not grown.ended or t in rows.shown) and t not in rows.hidden


class Grown:
    """One row's new text as Choices.stopped grows it (a byte-level BPETokenizer's): the row's new tokens' bytes, up
    to its first end token (an end token in `shown` included) less the hidden ones, through an incremental UTF-8
    decoder, whose text is exactly tok.decode of the prompt and those ids less the prompt's text (the prompt ends on
    a whole character: nothing of it pending), U+FFFD for bytes still pending as decode's errors="replace" gives
    them. What cut_at_stop searches of it is kept: the text less its trailing U+FFFDs (a pending byte's is one, and
    committed ones are held as a count, `run`, until a character follows them), `whole` characters, of which only
    the tail from `base` on is kept (trim). `after`: min_tokens' (Choices.cut's: `whole` at the row's min_tokens-th
    token, or now while it has fewer)."""

    def __init__(self):
        import codecs

        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.count = 0  # the row's new ids read so far
        self.tail, self.base, self.whole = "", 0, 0  # the searched text from base on; its whole length
        self.run = 0  # the committed U+FFFDs after it (a long run of bad bytes is not copied each step)
        self.ended, self.after = False, 0

    def pending(self) -> str:
        return self.decoder.getstate()[0].decode("utf-8", errors="replace")

    @property
    def stable(self) -> int:
        """The searched text's length no later id changes: all of it (its bytes only grow)."""
        return self.whole

    def add(self, rows, ids):
        """ids: the row's next new ids (rows: its Choices, for the tokenizer, ends, shown and hidden)."""
        for t in ids:
            if _kept(self, rows, t):
                chunk = self.decoder.decode(rows.tok.decode_bytes([t]))
                some = chunk.rstrip("\ufffd")
                if some:  # (a character after the run: the run is searched text now)
                    self.tail += "\ufffd" * self.run + some
                    self.whole += self.run + len(some)
                    self.run = 0
                self.run += len(chunk) - len(some)
            if self.count <= rows.min_tokens:
                self.after = self.whole  # (Choices.cut's: the U+FFFDs after it, run and pending, not counted)

    def trim(self, hold: int):
        """Keeps the last `hold` searched characters only (a stop string's start in them may end in the next)."""
        if len(self.tail) > hold:
            cut = len(self.tail) - hold
            self.tail, self.base = self.tail[cut:], self.base + cut


class GrownText:
    """Grown's for an HFTokenizer whose decoder is local: the row's kept new ids after the prompt's in a Window
    (hf_tokenizer.Window: the prompt's ids done), whose text past its done ids (`loose`: a trailing run of
    byte-fallback tokens, a cut character) is decoded again each call, a window of the last ids, not the row. Only
    the done text (its length past the prompt's text `stable`) is kept searched for good: a byte-fallback token may
    turn the loose text's characters to U+FFFDs. tail, base, whole, after, count, trim: Grown's."""

    def __init__(self, prompt):
        import copy

        self.window = copy.copy(prompt)
        self.window.ids = list(prompt.ids)
        self.prompt, self.stable = prompt.done, 0  # the prompt's text's length; the done text's past it
        self.count, self.ended, self.after = 0, False, 0
        self.done, self.base = "", 0  # the done text from base on
        self.tail, self.whole, self.loose = "", 0, ""

    def add(self, rows, ids):
        """ids: the row's next new ids (rows: its Choices, for the tokenizer, ends, shown and hidden)."""
        grew = False
        for t in ids:
            if _kept(self, rows, t):
                self.window.ids.append(t)
                grew = True
            if self.count <= rows.min_tokens:  # (the text's length at each of the first min_tokens ids, less the
                if grew:  # U+FFFDs it ends in: Choices.cut's, as the stream and vLLM count it)
                    self._read()
                grew = False
                self.after = self.whole
        if grew:
            self._read()

    def _read(self) -> str:
        w = self.window
        n = len(w.ids)
        loose = w.text(n) if n > w.r else ""
        if w.commit(n, loose):
            self.done, loose = self.done + loose, ""
        self.stable, self.loose = w.done - self.prompt, loose
        searched = loose.rstrip("\ufffd")  # (cut_at_stop's: the text less its trailing U+FFFDs)
        self.tail, self.whole = self.done + searched, self.stable + len(searched)
        return loose

    def trim(self, hold: int):
        """Keeps the last `hold` characters of the done text only (and of tail, which starts with it: a call that
        adds no text searches it again, from base)."""
        if len(self.done) > hold:
            cut = len(self.done) - hold
            self.done, self.tail, self.base = self.done[cut:], self.tail[cut:], self.base + cut


class HeldBack:
    """A stream's new text as it may be sent: less its last len(longest stop) - 1 characters, where a stop string
    may be starting, and up to the first stop string once one is there (done). `generate --stream`'s TextStream and
    `serve`'s streamed choices send what add() returns; their pieces add up to the text cut_at_stop gives."""

    def __init__(self, stops=(), keep: bool = False):
        self.stops, self.keep = list(stops), keep
        self.new, self.sent, self.done = "", 0, False
        # keep (vLLM's include_stop_str_in_output): the stop string is sent too, nothing to hold back (as vLLM)
        self.hold = 0 if keep else max((len(s) for s in self.stops), default=1) - 1
        self.after = 0  # cut_at_stop's: the caller's (Delta's min_tokens)

    def add(self, chunk: str, final: bool = False) -> str:
        """chunk's share of what can be sent now (final: the stream's end, nothing held back)."""
        since = len(self.new.rstrip("\ufffd"))  # (what was searched before: the chunk's step is vLLM's window)
        self.new += chunk
        # (a stop string ending within that was looked for then, and is not there: only one ending past it is
        # searched for, not the whole text each chunk, which cost a long answer's stream time quadratic in its length)
        text, cut = cut_at_stop(self.new, self.stops, max(self.after, since), self.keep, since)
        # (a U+FFFD the text ends in held back too, where there are stop strings: one may yet start with it; the
        # stream decoder hands out no U+FFFD a later byte completes, so without them there is nothing to wait for)
        searched = self.new.rstrip("\ufffd") if self.stops else self.new
        end = len(text) if cut or final else max(self.sent, len(searched) - self.hold)
        out = self.new[self.sent:end]
        self.sent, self.done = end, bool(cut)
        return out

    @property
    def sent_text(self) -> str:
        return self.new[:self.sent]


class TextStream:
    """generate's on_token for one sample: prints the prompt's text, then the new text as its tokens are drawn,
    through ContinuationStream (a character split across tokens printed whole once complete), so the printed text
    is what generate prints without --stream."""

    def __init__(self, tok, prompt_ids, eot, stops=(), ends=()):
        # ends: the other end tokens (the model's generation config's), not printed either
        self.ends, self.held = {eot, *ends}, HeldBack(stops)
        # the new text as continuation() has it (serve's Delta's): a stop string is searched for in it alone, as
        # without --stream. The prompt's stream decoder holds its last characters back where later ids may change
        # them (a run of byte-fallback tokens), and handed them on with the first new text, where a stop string in
        # them stopped the stream, or cut it elsewhere, but not the text printed without --stream.
        self.text = ContinuationStream(tok, prompt_ids)
        print(tok.decode(prompt_ids), end="", flush=True)  # (the prompt's text as printed without --stream)

    def __call__(self, new):
        i = int(new[0, 0])
        if i not in self.ends and not self.held.done:  # the marker that ends the text is not printed (nothing follows)
            self.write(self.text.write([i]))

    def write(self, chunk: str, final: bool = False):
        print(self.held.add(chunk, final), end="", flush=True)

    def close(self):
        if not self.held.done:
            self.write(self.text.flush(), final=True)
        print()


def export_target(cfg) -> tuple:
    """(family, refuse, export): the Hugging Face folder `export` writes this model as, the first whose touches it has:
    Granite's or GraniteMoe's (muP multipliers, or scaled logits on RMSNorm blocks), GPT-OSS's for experts with
    biases or its clamped SwiGLU, Mixtral's, Qwen3-MoE's, Qwen2-MoE's or OLMoE's for another mixture of experts
    (n_experts), Nemotron's (the squared-ReLU MLP over LayerNorms), Arcee's (over RMSNorms), GPT-BigCode's (GPT-2
    with one key/value head), BLOOM's (ALiBi with embed_norm), MPT's (ALiBi without biases), EXAONE 4's (no input
    norms, each head's q and k normalized), OLMo's (no input norms, q/k norms over all heads: an OLMo has post_norms
    too), GLM-4's (sandwich norms on a SwiGLU MLP), then Gemma's (scaled embeddings, sandwich norms, GeGLU...),
    Cohere's (a SwiGLU MLP in a shared-norm parallel block over LayerNorms, or scaled logits; Cohere2's with local
    layers), StableLM's (LayerNorms with SwiGLU), Phi-3's (a partial rotary or LongRoPE on a Llama), a Llama's
    (RMSNorm or SwiGLU: or a Mistral, a Qwen2... as hf_family says), GPT-Neo's (unscaled attention scores); then,
    for RoPE over LayerNorms and a GELU MLP: StarCoder2's (a sequential GELU-tanh block with grouped-query or local
    attention, GPT-NeoX's refusals), GPT-J's (a shared-norm parallel block, an LM-head bias, no q/k/v biases),
    Falcon's (the exact GELU, no LM-head bias, and a shared norm, grouped key/value heads or no biases), Phi's (one
    norm in a parallel block or an LM-head bias), GPT-NeoX's; else GPT-2. An ALiBi model none of them takes falls
    through to a family that refuses ALiBi by name. refuse(model, what) names what that family cannot say."""
    from tritongpt.train import arcee_weights, bloom_weights, cohere_weights, exaone4_weights, falcon_weights, \
        gemma_weights, glm4_weights, gpt2_weights, gpt_bigcode_weights, gpt_neo_weights, gpt_oss_weights, \
        gptj_weights, granite_weights, llama_weights, moe_weights, mpt_weights, nemotron_weights, neox_weights, \
        olmo_weights, phi3_weights, phi_weights, stablelm_weights, starcoder2_weights

    if granite_weights.is_granite_shaped(cfg):  # before the MoE families: GraniteMoe writes experts with multipliers
        return granite_weights.family_name(cfg), granite_weights.refuse_not_granite, granite_weights.export_granite
    if gpt_oss_weights.is_gpt_oss_shaped(cfg):  # experts with GPT-OSS's biases or clamped SwiGLU
        return "GPT-OSS", gpt_oss_weights.refuse_not_gpt_oss, gpt_oss_weights.export_gpt_oss
    if cfg.n_experts:  # only these write experts; each refuses the rest by name
        return moe_weights.family_name(cfg), moe_weights.refuse_not_moe, moe_weights.export_moe
    if cfg.mlp == "relu2" and cfg.norm == "layernorm":  # the squared-ReLU MLP over LayerNorm(1P)s: a Nemotron
        return "Nemotron", nemotron_weights.refuse_not_nemotron, nemotron_weights.export_nemotron
    if cfg.mlp == "relu2":  # the squared-ReLU MLP over RMSNorms: only an Arcee folder says it (it refuses the rest)
        return "Arcee", arcee_weights.refuse_not_arcee, arcee_weights.export_arcee
    if gpt_bigcode_weights.is_gpt_bigcode_shaped(cfg):  # GPT-2 with one key/value head: multi-query attention
        return "GPT-BigCode", gpt_bigcode_weights.refuse_not_gpt_bigcode, gpt_bigcode_weights.export_gpt_bigcode
    if bloom_weights.is_bloom_shaped(cfg):
        return "BLOOM", bloom_weights.refuse_not_bloom, bloom_weights.export_bloom
    if mpt_weights.is_mpt_shaped(cfg):
        return "MPT", mpt_weights.refuse_not_mpt, mpt_weights.export_mpt
    if exaone4_weights.is_exaone4_shaped(cfg):  # no input norms as OLMo's, but q/k norms per head: before OLMo's
        return "EXAONE 4", exaone4_weights.refuse_not_exaone4, exaone4_weights.export_exaone4
    if olmo_weights.is_olmo_shaped(cfg):
        return olmo_weights.family_name(cfg), olmo_weights.refuse_not_olmo, olmo_weights.export_olmo
    if glm4_weights.is_glm4_shaped(cfg):  # sandwich norms on SwiGLU: before Gemma's, which are GeGLU
        return "GLM-4", glm4_weights.refuse_not_glm4, glm4_weights.export_glm4
    if gemma_weights.is_gemma_shaped(cfg):
        return gemma_weights.family_name(cfg), gemma_weights.refuse_not_gemma, gemma_weights.export_gemma
    if cohere_weights.is_cohere_shaped(cfg):
        family = "Cohere2" if cohere_weights.hf_family(cfg) == "cohere2" else "Cohere"
        return family, cohere_weights.refuse_not_cohere, cohere_weights.export_cohere
    if stablelm_weights.is_stablelm_shaped(cfg):
        return "StableLM", stablelm_weights.refuse_not_stablelm, stablelm_weights.export_stablelm
    if cfg.norm == "rmsnorm" or cfg.mlp == "swiglu":
        if phi3_weights.is_phi3_shaped(cfg):
            return "Phi-3", phi3_weights.refuse_not_phi3, phi3_weights.export_phi3
        return llama_weights.family_name(cfg), llama_weights.refuse_not_llama, llama_weights.export_llama
    if not cfg.scale_attention:
        return "GPT-Neo", gpt_neo_weights.refuse_not_gpt_neo, gpt_neo_weights.export_gpt_neo
    if starcoder2_weights.is_starcoder2_shaped(cfg):  # grouped-query or local attention GPT-NeoX cannot say
        return "StarCoder2", starcoder2_weights.refuse_not_starcoder2, starcoder2_weights.export_starcoder2
    if gptj_weights.is_gptj_shaped(cfg):
        return "GPT-J", gptj_weights.refuse_not_gptj, gptj_weights.export_gptj
    if falcon_weights.is_falcon_shaped(cfg):
        return "Falcon", falcon_weights.refuse_not_falcon, falcon_weights.export_falcon
    if phi_weights.is_phi_shaped(cfg):
        return "Phi", phi_weights.refuse_not_phi, phi_weights.export_phi
    if neox_weights.is_neox_shaped(cfg):
        return "GPT-NeoX", neox_weights.refuse_not_neox, neox_weights.export_neox
    return "GPT-2", gpt2_weights.refuse_not_gpt2, gpt2_weights.export_gpt2


def article(name: str) -> str:
    return "an" if name.startswith(("OLMo", "OLMoE", "MPT", "EXAONE")) else "a"


def gptq_options(meta: dict, mode: str) -> str:
    """", act-order, true-sequential" (or ", not true-sequential"): a GPTQ file's options as its metadata records
    them (files from before they were recorded: nothing said). mode: int4's act-order has static groups; int8 has
    a scale a row, no groups."""
    said = ""
    if meta.get("quantized_act_order") == "true":
        said = ", act-order (static groups)" if mode == "int4" else ", act-order"
    sequential = meta.get("quantized_true_sequential")
    return said + {"true": ", true-sequential", "false": ", not true-sequential"}.get(sequential, "")


def awq_options(meta: dict) -> str:
    """", input of ff.fc2 unscaled": an AWQ file's stages no scale folded into (clipped only), as its metadata
    records them; nothing for another file."""
    unscaled = meta.get("quantized_awq_unscaled")
    return f", input of {unscaled.replace(',', ', ')} unscaled" if unscaled else ""


def cmd_quantize(args):
    """`tritongpt quantize MODEL --out DIR [--quantize int4 --group-size G]`: the model's int8 (default) or int4
    weights (model/quant.py quantize) as DIR/model.safetensors, with its tokenizer and prompt format, for the commands
    that run a model to load as they are (such a file never makes the float matrices: a model whose fp32 weights do
    not fit loads)."""
    import json
    from pathlib import Path

    import torch

    from tritongpt.model.quant import linear_bytes, quantize
    from tritongpt.train.chat import run_template
    from tritongpt.train.common import dist_env, model_out_folder, pick_device
    from tritongpt.train.evaluate import PRETRAIN_DATA, pretrain_data
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.sft import pick_tokenizer
    from tritongpt.train.tokenizer import save_run_tokenizer

    world = dist_env()[2]
    if world > 1:  # (pick_device would give each its own GPU: each would quantize and write the one --out)
        raise UserError(f"quantize runs in one process, not under torchrun (WORLD_SIZE={world}): every process would "
                        "write the same --out; run it without torchrun")
    out = Path(args.out)
    calibration_flags = [flag for flag in ("--calibration", "--calibration-samples", "--calibration-length")
                         if getattr(args, flag_dest(flag)) is not None]
    calibrated = args.method in ("gptq", "awq")
    if args.quantize is None:
        if args.method == "gptq":  # GPTQ's cost and file are int4's or int8's: which is said, not assumed
            raise UserError("--method gptq needs --quantize int4 or --quantize int8")
        if args.method == "awq":
            raise UserError("--method awq needs --quantize int4")
        args.quantize = "int8"
    if args.method == "awq" and args.quantize != "int4":  # (before the model loads: quantize_awq says it too)
        raise UserError(f"--method awq quantizes to int4 (AutoAWQ's 4-bit groups), not --quantize {args.quantize}: "
                        "use --method gptq or rtn for int8")
    if not calibrated and calibration_flags:
        raise UserError(f"{calibration_flags[0]} is GPTQ's and AWQ's calibration: pass --method gptq or awq too")
    if args.method != "gptq" and (args.act_order or args.true_sequential is not None):
        flag = "--act-order" if args.act_order else \
            "--true-sequential" if args.true_sequential else "--no-true-sequential"
        raise UserError(f"{flag} is GPTQ's: pass --method gptq too " + (
            "(round-to-nearest rounds each weight on its own)" if args.method == "rtn" else
            "(AWQ scales and clips each matrix, then rounds it to nearest: no column order, no stages to choose)"))
    group = group_size(args)
    samples = 128 if args.calibration_samples is None else args.calibration_samples
    if samples < 1:
        raise UserError(f"--calibration-samples must be at least 1, got {samples}")
    if args.calibration_length is not None and args.calibration_length < 1:
        raise UserError(f"--calibration-length must be at least 1, got {args.calibration_length}")
    device = pick_device(args.device)
    target = model_out_folder("quantize", out, [args.weights], args.overwrite, f"the {args.quantize} model",
                              "the model quantized")
    model = load_checkpoint(args.weights, args.model, quantized_ok=True)
    if getattr(model, "quantized", None):
        raise UserError(f"{args.weights} is {model.quantized}-quantized already")
    tok = pick_tokenizer(args.tokenizer, args.weights, model.config.vocab_size)
    fmt = run_template(args.weights)
    extra = {"quantized_from": str(args.weights), "quantized_method": args.method,
             **({"prompt_format": fmt} if fmt else {})}
    # a pretraining run's data record (its state.pt stays behind): eval scores the run's held-out tail, as on MODEL
    record = pretrain_data(args.weights)
    if record is not None:
        extra[PRETRAIN_DATA] = json.dumps(record, default=str)
    calibration = doc_ids = None
    options = {}
    if calibrated:
        calibration, said, doc_ids = calibration_tokens(args, model.config.context_length, tok, record, samples)
        extra.update(quantized_calibration=said)
    if args.method == "gptq":
        options = {"act_order": args.act_order, "true_sequential": GPTQ_TRUE_SEQUENTIAL if args.true_sequential is None
                   else args.true_sequential}
        extra.update({f"quantized_{k}": str(v).lower() for k, v in options.items()})
    if args.method == "awq":
        options = {"report": {}}
    before = linear_bytes(model)
    try:
        if calibrated:  # its forwards (GPTQ's Hessians, AWQ's searches) where the model is: the device's, all of it
            model.to(device)
        quantize(model, args.quantize, head=not args.no_head, group_size=group, method=args.method,
                 calibration=calibration, doc_ids=doc_ids, device=device, **options)  # rtn: each matrix there
    except torch.OutOfMemoryError:  # --device auto takes the GPU, where a model the CPU quantized may not fit
        hints = (["--device cpu (the host's memory)"] if device.type != "cpu" else []) \
            + ([f"fewer --calibration-samples ({args.method.upper()} keeps each sample's activations)"] if calibrated
               else [])
        raise UserError(f"quantizing ran out of memory on {device}" + (": pass " + ", or ".join(hints) if hints
                                                                       else "")) from None
    if args.method == "awq":  # the stages whose scale nothing folds into (clipped only): GPT-2's fc2, after a GELU
        unscaled = sorted({name.split(".", 2)[2] for name in options["report"]["unscaled"]})
        extra.update(quantized_awq_unscaled=",".join(unscaled))
    model.cpu()
    out.mkdir(parents=True, exist_ok=True)
    model.save(target, extra)
    save_run_tokenizer(tok, out)
    print(f"quantize: {describe_quantized(model)}, {model.quantized_linears} matrices, {before / 2**20:,.1f} MiB -> "
          f"{linear_bytes(model) / 2**20:,.1f} MiB as the matmuls read them -> {target} "
          f"({target.stat().st_size / 2**20:,.1f} MiB)"
          + (f", {args.method.upper()} on {said}{gptq_options(extra, args.quantize)}{awq_options(extra)}"
             if calibration is not None else ""))
    return 0


def calibration_tokens(args, context_length: int, tok, record, samples: int):
    """GPTQ's and AWQ's calibration for `tritongpt quantize` (args.method's): (token ids [samples, T], what they are,
    in words, doc_ids). The text is --calibration, else the data the model's pretraining run trained on (its record:
    its training split, never the held-out tail eval scores), else the embedded default corpus (pydoc, the
    quickstart's); T is --calibration-length, else the model's context. The windows start at evenly spaced tokens
    of the training split, so the same flags give the same file. doc_ids [samples, T]: each window's documents
    (data.document_ids) where the run trained with --document-mask (its record says so), as eval then scores it;
    else None."""
    import torch

    from tritongpt.train import data
    from tritongpt.train.evaluate import own_split

    method = {"awq": "AWQ"}.get(getattr(args, "method", None), "GPTQ")
    length = context_length if args.calibration_length is None else args.calibration_length
    if length > context_length:
        raise UserError(f"--calibration-length {length} is longer than the model's context ({context_length})")
    if args.calibration is not None:
        source = {"source": args.calibration, "text_field": "text"}
    elif record is not None and "sources" in record:
        raise UserError("the model's run trained on a mixture of sources: pass --calibration, the text to calibrate "
                        f"{method} on")
    elif record is not None:
        source = {"source": record["source"], "text_field": record.get("text_field") or "text"}
    else:
        source = {"source": None, "text_field": "text"}
    try:
        td = data.prepare_tokens(source, tok)
    except UserError as e:
        if args.calibration is not None or record is None:
            raise
        raise UserError(f"{e}; it is the data the model's run trained on: pass --calibration, the text to "
                        f"calibrate {method} on") from None
    train = td.train if len(td.train) else td.tokens
    # the run's own split, whatever --val-fraction it held out: where its documents are tokenised as the run had
    # them (eval's test for scoring the run's own tail; else eval scores the last tenth, which td.train stops at)
    if args.calibration is None and td.tokens is not None and own_split(td, record, tok):
        train = td.tokens[:record["train_tokens"]]
    if train is None or len(train) < length:
        raise UserError(f"{source['source'] or 'pydoc'} has {0 if train is None else len(train):,} training tokens: "
                        f"too few for one --calibration-length {length} sample")
    starts = torch.linspace(0, len(train) - length, samples).long().unique().tolist()
    ids = torch.stack([torch.from_numpy(train[s:s + length].astype("int64")) for s in starts])
    said = f"{len(starts)} x {length} tokens of {source['source'] or 'pydoc'}"
    if len(starts) < samples:
        note(f"{method}: {source['source'] or 'pydoc'}'s {len(train):,} training tokens hold {len(starts)} distinct "
             f"samples of {length}, not {samples}")
    # a model trained with its documents apart never attended across them: calibrated as it ran, and as eval scores
    doc_ids = data.document_ids(ids, tok.eot_id, td.meta.get("bos_id")) if record and record.get("document_mask") \
        else None
    return ids, said, doc_ids


def is_qlora_checkpoint(path) -> bool:
    """Whether path (a resolved checkpoint) is a tritongpt file of LoRA updates on a quantized base (sft --quantize)."""
    from tritongpt.model.gpt import safetensors_metadata
    from tritongpt.train.common import saved_model_config

    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix != ".safetensors" or not file.is_file():
        return False
    return bool(safetensors_metadata(file).get("quantized")) and bool(saved_model_config(file).get("lora_rank"))


def cmd_export(args):
    import copy
    import json
    from pathlib import Path

    from tritongpt.model.lora import strip_lora
    from tritongpt.train.chat import EXPORTED_FORMAT, run_template
    from tritongpt.train.common import load_state, resolve_checkpoint
    from tritongpt.train.formats import hf_chat_template
    from tritongpt.train.gpt2_weights import adapter_base, export_peft_adapter, load_checkpoint, peft_family
    from tritongpt.train.sft import pick_tokenizer
    from tritongpt.train.tokenizer import EXPORT_TOKENIZER, RUN_TOKENIZER, eot_or_none, is_ours
    from tritongpt.train.chat_template import turn_end_id
    from tritongpt.train.reward import (RewardModel, export_reward_model, fold_head_bias, is_reward_checkpoint,
                                        pad_token_for, refuse_no_classifier)

    if args.base is not None and not args.adapter:
        raise UserError("--base names the model an --adapter goes on: pass --adapter too")
    if args.format == "gguf":
        return export_gguf(args)
    if args.gguf_type is not None:
        raise UserError("--gguf-type sets a GGUF file's tensor type: pass --format gguf too")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: name a folder")
    source = resolve_checkpoint(args.checkpoint)
    run_files = [n for n in ("state.pt", "metrics.jsonl", RUN_TOKENIZER) if (out / n).is_file()
                 and (n != RUN_TOKENIZER or is_ours(out / n))] + [p.name for p in out.glob("ckpt-*")][:1]
    if run_files or (out.is_dir() and out.resolve() in (source.parent.resolve(), source.resolve().parent)):
        raise UserError(f"--out {out} is a tritongpt run or checkpoint folder ({', '.join(run_files) or source.name}): "
                        "export into a folder of its own")
    # what transformers reads in a model folder: all of it replaced, none of it left from before
    # (a peft adapter's config would make from_pretrained load its base model plus the adapter)
    hf_files = ("model.safetensors", "config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                EXPORT_TOKENIZER, RUN_TOKENIZER, "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "chat_template.jinja", "chat_template.json",
                "additional_chat_templates", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
    taken = [n for n in hf_files if (out / n).exists()]
    if taken and not args.overwrite:
        raise UserError(f"{out} already holds {', '.join(taken)}: pass --overwrite or another --out")
    reward = is_reward_checkpoint(source)
    if reward and args.adapter:
        raise UserError(f"--adapter: {source} is a reward model, whose scalar head a peft adapter for a causal LM "
                        "cannot hold: export it without --adapter, whole (merged), as a sequence classifier")
    model = RewardModel.load(source, quantized_ok=True) if reward else load_checkpoint(
        source, merge=not args.adapter, quantized_ok=is_qlora_checkpoint(source))
    qlora = getattr(model, "quantized", None)  # QLoRA's (an int8/int4 file without updates was refused by name)
    if qlora and not args.adapter:  # (an adapter: the updates alone, for the float base the run quantized)
        from tritongpt.model.lora import merge_lora

        merge_lora(model.backbone if reward else model)  # the float model it computes: dequantized W + scale B A
    backbone = model.backbone if reward else model
    cfg = backbone.config
    # a peft adapter is GPT-2's or a Llama-family model's (peft_family: any other is refused by name); a whole model
    # goes as the family export_target picks. Refused before any file goes.
    if args.adapter:
        family, export = peft_family(model), None
    else:
        family, refuse, export = export_target(cfg)
        refuse(backbone, f"{article(family)} {family} folder")
        if reward:
            refuse_no_classifier(family)
    if args.adapter:
        if not cfg.lora_rank:
            raise UserError(f"--adapter: {source} holds no LoRA update (a run trained with --lora-rank has one): "
                            "export the model without --adapter")
        init = load_state(source.parent, mmap=True).get("args", {}).get("init") \
            if (source.parent / "state.pt").is_file() else None
        base = adapter_base(args.base, init, strip_lora(copy.deepcopy(model)))
    tok = pick_tokenizer(args.tokenizer, args.checkpoint, cfg.vocab_size)
    # a run tuned on chats: transformers' apply_chat_template writes them as it was trained (in the
    # model's own template, which the run's tokenizer keeps only if its chats were rendered in it)
    chat = run_template(args.checkpoint) == "chat"
    template = getattr(tok, "chat_template", None) or (hf_chat_template(tok) if chat else None)
    # (its named ones too, "tool_use": the exported folder renders a chat with tools as the run's tokenizer does)
    named = getattr(tok, "chat_templates", None) if template is getattr(tok, "chat_template", None) else None
    try:  # made before anything is written: a refusal must not leave a half export
        tok_files = tok.hf_files(cfg.context_length, template, named)
    except UserError as e:
        tok_files = {}
        note(f"the tokenizer is not exported: {e}")
    if reward:  # Hugging Face's classifier reads the score at the last token that is not its pad token
        eot = eot_or_none(tok)
        turn_end = turn_end_id(tok) if getattr(tok, "chat_template", None) is not None else None
        ends = {i for i in (eot, turn_end) if i is not None}
        pad_id, pad_text = pad_token_for(tok_files, ends)
        if "tokenizer_config.json" in tok_files and pad_text is not None:
            tok_config = json.loads(tok_files["tokenizer_config.json"])
            tok_files["tokenizer_config.json"] = json.dumps({**tok_config, "pad_token": pad_text}, indent=2,
                                                            ensure_ascii=False) + "\n"
        unfolded = fold_head_bias(model)
    for name in taken:  # an earlier export's (or model's) files would be read as this one's
        if (out / name).is_dir():  # (additional_chat_templates/: transformers reads its *.jinja as named templates)
            for path in (out / name).glob("*.jinja"):
                path.unlink()
        else:
            (out / name).unlink()
    if args.adapter:
        paths = export_peft_adapter(model, out, base)
    elif reward:
        paths = export_reward_model(model, out, export, eot, pad_id)
    else:
        paths = export(model, out, eot_or_none(tok))
        fmt = run_template(args.checkpoint)
        if fmt is not None:  # `tritongpt chat --weights OUT` prompts it as the run was tuned
            config = json.loads((out / "config.json").read_text(encoding="utf-8"))
            (out / "config.json").write_text(json.dumps({**config, EXPORTED_FORMAT: fmt}, indent=2) + "\n",
                                             encoding="utf-8")
    for name, text in tok_files.items():
        (out / name).write_text(text, encoding="utf-8")
        paths.append(out / name)
    if hasattr(tok, "save"):  # ours too, for tritongpt: exact even where Hugging Face has no spelling for it
        paths.append(tok.save(out / EXPORT_TOKENIZER))
    if args.adapter:
        print(f"wrote {out}/ ({', '.join(p.name for p in paths)}): the LoRA update (rank {cfg.lora_rank}, alpha "
              f"{cfg.lora_alpha:g} on {cfg.lora_targets}) of {article(family)} {family} with {cfg.n_layer} layers, for "
              f"the base {base}")
        hf_class = "GPT2LMHeadModel" if family == "GPT-2" else "AutoModelForCausalLM"
        print(f"load it with peft.AutoPeftModelForCausalLM.from_pretrained({str(out)!r}), or "
              f"peft.PeftModel.from_pretrained({hf_class}.from_pretrained({base!r}), {str(out)!r})")
        own = load_state(source.parent, mmap=True).get("args", {}).get("init_quantized") \
            if (source.parent / "state.pt").is_file() else None
        if own and own.startswith("gguf "):  # (peft loads no .gguf: the base is the file's float export)
            note(f"the run trained this update on its --init file's own {own.upper()} blocks; the adapter goes on "
                 f"their float model {base} (the file's export, its matrices those blocks dequantized exactly, "
                 "checked): the run's model")
        elif own:  # (sft --lora-rank on a GPTQ/AWQ folder: commands.folder_base; the base is that folder)
            note(f"the run trained this update on its base folder's own {own.upper()} matrices; peft puts the adapter "
                 f"on that folder as transformers loads it (its {own.split()[0].upper()} Linears: the run's frozen "
                 "matrices)")
        elif qlora:
            note(f"the run trained this update on its base's matrices {describe_quantized(model)}; the adapter goes "
                 f"on the float base {base}, which peft loads it onto as it is (the float model plus the update, "
                 "not the run's quantized one: each matrix weight differs by up to half a quantization step) or "
                 "onto its 4-bit load (BitsAndBytesConfig(load_in_4bit=True): bitsandbytes' quantization, not "
                 "the run's)")
        return 0
    what = f"a reward model on {family}'s backbone" if reward else family
    print(f"wrote {out}/ ({', '.join(p.name for p in paths)}): {what} with {cfg.n_layer} layers, {cfg.n_head} heads, "
          f"width {cfg.n_embd}, vocabulary {cfg.vocab_size}, context {cfg.context_length}")
    if reward:
        if unfolded:
            note(f"the reward head's bias ({unfolded:.6g}) has no place in Hugging Face's {family} classifier (its "
                 "score has no bias, its final norm none to fold it into): the exported scores are this model's "
                 "minus it (their differences, all Bradley-Terry trains on, are the same)")
        end = "the chat template's end of turn" if chat else "the end-of-text token"
        print(f"load it with transformers.AutoModelForSequenceClassification.from_pretrained({str(out)!r}): it "
              f"scores a prompt and response written as in training and closed by {end}, as tritongpt's "
              f"reward model does; pad on the right with its pad token (id {pad_id}), which is never scored")
        return 0
    how = (" (and AutoTokenizer" + (", whose apply_chat_template writes chats in the template the run was "
                                     "tuned on" if chat else "") + ")") if tok_files else ""
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}){how}, or "
          "`tritongpt generate --weights` on its model.safetensors")
    return 0


def export_gguf(args):
    """`export --format gguf`: the model and its tokenizer as one .gguf file (train/gguf_export.py) for llama.cpp,
    Ollama, LM Studio. A whole causal LM only: GGUF's LoRA adapters and classifiers are not written."""
    from pathlib import Path

    from tritongpt.train.chat import run_template
    from tritongpt.train.common import resolve_checkpoint
    from tritongpt.train.formats import hf_chat_template
    from tritongpt.model.lora import has_lora
    from tritongpt.train.gguf_export import BLOCK_TYPES, import_gguf, write_gguf
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.reward import is_reward_checkpoint
    from tritongpt.train.sft import pick_tokenizer

    import_gguf()  # before the model loads: the remedy first
    out = Path(args.out)
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: --format gguf writes one file; name it NAME.gguf")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name the .gguf file to write")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists: pass --overwrite or another --out")
    if args.adapter:
        raise UserError("--adapter with --format gguf: the GGUF writer writes whole models only; export the merged "
                        "model (without --adapter), or the adapter as a peft folder (without --format gguf)")
    source = resolve_checkpoint(args.checkpoint)
    if is_reward_checkpoint(source):
        raise UserError(f"{source} is a reward model, whose scalar head a GGUF causal LM cannot hold: export it as "
                        "a Hugging Face folder (without --format gguf)")
    kind = args.gguf_type or "f16"
    # a quantized model (a `quantize` output, a .gguf kept quantized) loads as it is for a block type: its levels
    # and scales go into the file's blocks as they are (write_gguf), not rounded a second time
    model = load_checkpoint(source, quantized_ok=is_qlora_checkpoint(source) or kind in BLOCK_TYPES)
    if getattr(model, "quantized", None) and (has_lora(model) or kind not in BLOCK_TYPES):
        from tritongpt.model.lora import merge_lora  # QLoRA's: the float model it computes, W dequantized + scale B A

        merge_lora(model)
    cfg = model.config
    family, refuse, _ = export_target(cfg)
    refuse(model, f"{article(family)} {family} folder")
    tok = pick_tokenizer(args.tokenizer, args.checkpoint, cfg.vocab_size)
    chat = run_template(args.checkpoint) == "chat"
    template = getattr(tok, "chat_template", None) or (hf_chat_template(tok) if chat else None)
    path = write_gguf(model, out, tok, kind, family=family, chat_template=template)
    print(f"wrote {path} ({kind.upper()}): {family} with {cfg.n_layer} layers, {cfg.n_head} heads, width "
          f"{cfg.n_embd}, vocabulary {cfg.vocab_size}, context {cfg.context_length}")
    print(f"run it with llama.cpp (llama-cli -m {path}), or Ollama (a Modelfile's FROM {path})")
    return 0


def add_generation_model_args(p, default_text="tiny, gpt2-small with --pretrained, or what --weights holds"):
    """The model flags of `generate` and `chat`: what load_generation_model reads. default_text: --model's default
    as the help says it (serve's has no tiny: it refuses to run without --weights or --pretrained)."""
    # (check_model_source: --pretrained downloads gpt2-small when --model is not given)
    add_model_args(p, default_model=None, default_text=default_text)
    p.add_argument("--weights",
                   help="tritongpt checkpoint (file or run folder), " + HF_WEIGHTS_HELP + ", or " + HUB_REPO_HELP)
    p.add_argument("--pretrained", action="store_true",
                   help="download GPT-2 or GPT-Neo weights from the Hub by --model name")
    p.add_argument("--tokenizer", help=TOKENIZER_CHOICES + " (default: the one saved with "
                                       "--weights' run, else by vocab size)")
    add_quantize_arg(p)


def add_quantize_arg(p):
    """--quantize and --group-size of the commands that only run a model (generate, chat, serve, eval, hellaswag,
    lambada): model/quant.py."""
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="weight-only quantization at load time of every matrix of the blocks and the LM head; "
                        "activations keep their dtype. int8: an fp32 scale a row (a quarter of fp32's bytes, half "
                        "of bf16's); int4: 4-bit groups of --group-size inputs with an fp32 scale and offset each "
                        "(4.5 bits a weight at 128); default: the weights as loaded")
    add_group_size_arg(p)


QUANTIZE_CHOICES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128  # int4's group when --group-size is not given (model/quant.py's functions' default)
KV_CACHE_DTYPES = ("auto", "int8")  # model/layers.py's (not imported here: the parser loads without torch)
QUANTIZE_METHODS = ("rtn", "gptq", "awq")  # model/quant.py's (not imported here: the parser loads without torch)
GPTQ_TRUE_SEQUENTIAL = True  # quantize_gptq's default, as AutoGPTQ's (not imported: as QUANTIZE_METHODS)


def add_group_size_arg(p, flag: str = "--group-size"):
    from tritongpt.model.quant import GROUP_SIZES

    p.add_argument(flag, type=int, choices=GROUP_SIZES, default=None, metavar="G",
                   help=f"int4's group: G consecutive inputs of a row share a scale and an offset (one of "
                        f"{', '.join(map(str, GROUP_SIZES))}; default {DEFAULT_GROUP_SIZE}; smaller is closer and "
                        "larger)")


def flag_dest(flag: str) -> str:
    """argparse's attribute of a flag: --group-size -> group_size."""
    return flag.removeprefix("--").replace("-", "_")


def group_size(args, flag: str = "--group-size") -> int:
    """--group-size (or `flag`, where a command's --group-size is another setting), int4's only: 128 when not
    given."""
    value = getattr(args, flag_dest(flag))
    if value is not None and args.quantize != "int4":
        raise UserError(f"{flag} sets int4's groups; it does nothing with --quantize {args.quantize}")
    return value or DEFAULT_GROUP_SIZE


def quantize(model, args, device=None, what: str = ""):
    """--quantize applied to a loaded model, its int8/int4 matrices made on device (model/quant.py quantize): called
    before the model moves there, so that only the quantized ones need to fit it (set_kernels after: the quantized
    matmuls follow "mlp"). Says what it saved, on stderr."""
    if getattr(args, "quantize", None) is None:
        if getattr(args, "group_size", None) is not None:
            raise UserError("--group-size sets int4's groups: pass --quantize int4 too")
        return model
    group = group_size(args)
    if getattr(model, "quantized", None) == args.quantize:  # a quantized file (`tritongpt quantize`): as saved
        if args.quantize == "int4" and args.group_size is not None and args.group_size != model.quantized_group_size:
            raise UserError(f"{what or 'the model'} is int4 with group size {model.quantized_group_size} already "
                            f"(saved so), not {args.group_size}: quantize its float weights again for another")
        note(f"{what or 'the model'} is {model.quantized} already (saved so): --quantize has nothing to do")
        return model
    if getattr(model, "quantized", None):  # the other mode: its float weights are not here to quantize again
        raise UserError(f"{what or 'the model'} is {describe_quantized(model)} already (saved so), not "
                        f"{args.quantize}: run it without --quantize, or quantize the float weights it was made from")
    from tritongpt.model.quant import linear_bytes, quantize as quantize_model

    before = linear_bytes(model)
    try:
        quantize_model(model, args.quantize, device=device, group_size=group)
    except UserError as e:  # (a draft's widths are its own: say which model a group size does not fit)
        raise UserError(f"{what}: {e}" if what else str(e)) from None
    note(f"{describe_quantized(model)} weight-only{f' ({what})' if what else ''}: {model.quantized_linears} matrices, "
         f"{before / 2**20:,.1f} MiB -> {linear_bytes(model) / 2**20:,.1f} MiB as the matmuls read them")
    return model


def describe_quantized(model) -> str:
    """"int8", or "int4 (group 128)" (int8 with a GPTQ 8-bit folder's group scales: "int8 (group 128)")."""
    out = model.quantized + (f" (group {model.quantized_group_size})" if model.quantized_group_size else "")
    other = getattr(model, "quantized_layers", None)  # (a mixed GGUF file's layers of another layout)
    return out + "".join(f" + {sum(lg == x for lg in other.values())} {x[0]} (group {x[1]})"
                         for x in sorted(set(other.values()))) if other else out


def add_cuda_graphs_arg(p):
    """--cuda-graphs of the commands that generate (generate, chat, serve): generate()'s cuda_graph."""
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each decode step (after the prompt's) as a CUDA graph captured at the first: the same "
                        "text without the host's per-launch cost, which a small model's step is mostly (CUDA only; "
                        "not with a draft or beams)")


def add_kv_cache_dtype_arg(p):
    """--kv-cache-dtype of the commands that generate (generate, chat, serve): generate()'s kv_cache_dtype."""
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="the KV cache's storage: auto, the model's compute dtype; int8, one byte a value with an fp32 "
                        "scale per head and position (about half a 16-bit cache's memory, and of the bytes a long "
                        "decode step reads; the logits move slightly). Every decoding path takes it (--num-samples, "
                        "--num-beams, --draft, --prompt-lookup, --cuda-graphs): a --draft model's own cache stays "
                        "float (default %(default)s)")


def check_cuda_graphs(args, device, model):
    """--cuda-graphs with a model whose decode step no graph replays (LongRoPE, mixture of experts), or on a machine
    (or --device) without CUDA: said once, before the first prompt, not at each answer's first decode step."""
    if not args.cuda_graphs:
        return
    from tritongpt.train.generate import check_graphable

    check_graphable(model)
    if device.type != "cuda":
        raise UserError(f"--cuda-graphs needs the model on a CUDA device; it is on {device.type}")


def add_dtype_arg(p):
    """--dtype of the commands that only run a model (generate, chat, hellaswag)."""
    from tritongpt.train.common import DTYPES  # (imports torch, which generate, chat and hellaswag run on anyway)

    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="autocast dtype: auto = bf16 on CUDA (fp16 before Ampere), fp32 on CPU (default %(default)s)")


def add_sampling_args(p, max_new_tokens: int, temperature: float, temperature_text: str):
    """The sampling flags of `generate` and `chat`, and the precision they run in."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="at most this many (default "
                   "%(default)s); generation stops early at the end-of-text token (<|endoftext|>; chat: a chat "
                   "template's end of turn) or a model folder's generation config's end tokens")
    # temperature None: the command picks it (generate: 0.8 sampling, 0 with --num-beams), temperature_text says how
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature (default {'%(default)s, ' * (temperature is not None)}"
                        f"{temperature_text}); 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the likeliest tokens whose probabilities sum to p (after --top-k)")
    p.add_argument("--min-p", type=float, default=None,
                   help="sample among the tokens at least this share as likely as the likeliest (after --top-p)")
    p.add_argument("--typical-p", type=float, default=None, metavar="P",
                   help="locally typical sampling, as transformers' typical_p: the tokens whose surprisal is nearest "
                        "the entropy, up to probability P (after --min-p; 1 = off)")
    p.add_argument("--epsilon-cutoff", type=float, default=None, metavar="E",
                   help="drop the tokens less likely than E (never the likeliest), as transformers' epsilon_cutoff "
                        "(after --typical-p; 3e-4 to 9e-4 in the paper; 0 = off)")
    p.add_argument("--eta-cutoff", type=float, default=None, metavar="E",
                   help="drop the tokens less likely than min(E, sqrt(E) * exp(-entropy)), as transformers' "
                        "eta_cutoff (after --epsilon-cutoff; 3e-4 to 2e-3 in the paper; 0 = off)")
    p.add_argument("--top-n-sigma", type=float, default=None, metavar="N",
                   help="sample among the tokens whose logit is within N standard deviations of the largest "
                        "(Tang et al. 2024, llama.cpp's top-n-sigma; right after --temperature, before --top-k)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 makes every token already in the text (prompt included) less likely, as transformers' "
                        "repetition_penalty (1.1-1.3 is usual; greedy decoding too)")
    p.add_argument("--frequency-penalty", type=float, default=None, metavar="F",
                   help="F in [-2, 2]: a token's logit less F times how often it is in the text generated so far "
                        "(not the prompt), as OpenAI's and vLLM's frequency_penalty; after --repetition-penalty, "
                        "greedy decoding too")
    p.add_argument("--presence-penalty", type=float, default=None, metavar="P",
                   help="P in [-2, 2]: the logit of every token in the text generated so far (not the prompt) less "
                        "P, as OpenAI's and vLLM's presence_penalty; after --frequency-penalty")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help="never draw a token that would repeat an N-token sequence already in the text (prompt "
                        "included), as transformers' no_repeat_ngram_size; 0 = off")
    p.add_argument("--seed", type=int, default=1337,
                   help="seeds the sampling, and the weights of a model without --weights/--pretrained "
                        "(default %(default)s)")
    add_dtype_arg(p)


def add_cli(sub):
    from tritongpt.train.serve import add_engine_args, add_lora_args
    from tritongpt.train.structured import add_structured_arg

    p = sub.add_parser("info", help=command_help("info"))
    p.add_argument("--model", default=None, help="preset name (default gpt2-small; with --weights, only to name the "
                                                 "heads of a GPT-2 file without its config.json)")
    p.add_argument("--weights", default=None, help="a checkpoint (file, checkpoint or run folder), "
                                                   + HF_WEIGHTS_HELP + ", or " + HUB_REPO_HELP
                                                   + ": its config and its run")
    p.add_argument("--untied", action="store_true", help="count a separate LM head")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help=command_help("generate"))
    add_generation_model_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue (no trailing space: BPE tokens carry "
                        "their leading space)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file, exactly as it is (a final "
                        "newline too)")
    prompt.add_argument("--prompts", metavar="FILE",
                        help="generate for every prompt of FILE, batched through the continuous-batching engine "
                             "(vLLM's offline LLM.generate), the results written to --out in FILE's order: a .jsonl "
                             "of {\"prompt\": TEXT} records (optional per-record max_tokens, temperature, top_k, "
                             "top_p, seed, stop over the flags), or a .txt of one prompt a line (blank lines skipped)")
    p.add_argument("--allow-special", action="store_true",
                   help="encode <|endoftext|> in the prompt as the special token")
    p.add_argument("--num-samples", type=int, default=1,
                   help=f"texts to draw from the prompt, in one batch, printed with {SAMPLE_SEPARATOR} between them "
                        "(default %(default)s)")
    p.add_argument("--stream", action="store_true", help="print the text as it is drawn, token by token")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a text where the new text holds TEXT, which is not printed (as vLLM's and OpenAI's "
                        "stop); repeat it for several (backslash escapes: --stop '\\n\\n')")
    add_sampling_args(p, max_new_tokens=50, temperature=None,
                      temperature_text=f"{GENERATE_TEMPERATURE}, as nanoGPT's sample.py; 0 with --num-beams")
    add_mask_args(p)
    add_draft_args(p, " (--num-samples too: every sample keeps as many draft tokens a step as the one that keeps "
                      "fewest)", lookup=True)
    add_beam_args(p)
    add_structured_arg(p)
    add_cuda_graphs_arg(p)
    add_kv_cache_dtype_arg(p)
    p.add_argument("--out", metavar="FILE", help="--prompts: the .jsonl to write, a record a sample (index, sample, "
                                                "prompt, text, finish_reason, prompt_tokens, completion_tokens)")
    add_engine_args(p, None, "--prompts: rows decoded together (default 32); a prompt's --num-samples take a row "
                             "each")
    add_lora_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help=command_help("quantize"),
                       description="Write a model's weight-only quantization (every matrix of the blocks and, "
                                   "unless --no-head, the LM head: int8 with an fp32 scale a row, or int4 in groups "
                                   "with an fp32 scale and offset each) as a folder that generate, chat, serve, eval, "
                                   "hellaswag and lambada load as it is.")
    p.add_argument("weights", metavar="MODEL", help="the model: a checkpoint file or folder, a run folder (its newest "
                                                    "checkpoint), a Hugging Face folder or " + HUB_REPO_HELP)
    p.add_argument("--out", required=True, help="the folder to write model.safetensors (and the tokenizer) into")
    p.add_argument("--model", default=None, help="the preset naming the heads of a GPT-2 file without config.json")
    p.add_argument("--tokenizer", help=TOKENIZER_CHOICES + " (default: the one saved with the model, else by vocab "
                                       "size); saved with the quantized model")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="int8 (default): an fp32 scale a row; int4: groups of --group-size inputs, an fp32 scale and "
                        "offset each")
    add_group_size_arg(p)
    p.add_argument("--method", choices=QUANTIZE_METHODS, default="rtn",
                   help="rtn (default): each weight rounded to its nearest level; gptq: GPTQ, each matrix's rounding "
                        "error corrected by the weights not yet rounded, for the least change of its outputs on "
                        "calibration text (the same layout; much lower loss at int4); awq: AWQ (int4 only), each "
                        "matrix's input channels scaled by their calibration activations' size (folded into the op "
                        "before it) and each group's range clipped, then rounded to nearest (the same layout)")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: each matrix's inputs quantized in order of decreasing calibration activation energy "
                        "(the Hessian's diagonal; AutoGPTQ's desc_act), at int4 with static groups (every group's scale "
                        "and offset fixed up front from the float weights: the file's layout, G consecutive inputs a "
                        "group, has no g_idx); int8's row scale makes it the permutation alone; the file's layout is "
                        "unchanged")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: within a block, quantize its matrices in the order it uses them (GPT-2: q/k/v, "
                        "then the attention output, then fc1, then fc2), each on the inputs the block's matrices "
                        "quantized before it give (AutoGPTQ's true_sequential; default: "
                        f"{'on' if GPTQ_TRUE_SEQUENTIAL else 'off'})")
    p.add_argument("--calibration", default=None,
                   help="GPTQ's and AWQ's calibration text: a corpus as pretrain --data takes it (default: the data "
                        "the model's pretraining run trained on, its training split, else the embedded pydoc corpus)")
    p.add_argument("--calibration-samples", type=int, default=None, metavar="N",
                   help="GPTQ, AWQ: how many windows of the calibration text (default 128)")
    p.add_argument("--calibration-length", type=int, default=None, metavar="T",
                   help="GPTQ, AWQ: tokens a window (default: the model's context)")
    p.add_argument("--device", default="auto",
                   help="where the quantizing runs: auto | cpu | cuda (auto: CUDA when present; GPTQ's and AWQ's "
                        "calibration forwards, Hessians and searches there, the float model moved there whole; "
                        "round-to-nearest makes each matrix there in turn) (default %(default)s)")
    p.add_argument("--no-head", action="store_true", help="keep the LM head in floating point (a tied head then "
                                                          "stays the embedding)")
    p.add_argument("--overwrite", action="store_true", help="replace a model.safetensors already in --out")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help=command_help("export"))
    p.add_argument("checkpoint",
                   help="tritongpt checkpoint: a model.safetensors, a checkpoint folder or a run folder (its newest)")
    p.add_argument("--out", required=True,
                   help="folder to write: model.safetensors, config.json and the tokenizer's vocab.json, merges.txt "
                        "and tokenizer_config.json")
    p.add_argument("--tokenizer", help=TOKENIZER_CHOICES + " (default: the one saved with the "
                                       "checkpoint's run, else by vocab size)")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA (or QLoRA) run's update alone, as a peft adapter (adapter_model.safetensors, "
                        "adapter_config.json) for its base model (a GPT-2, or a Llama, Mistral, Ministral, Qwen2, "
                        "Qwen3 or SmolLM3: q_proj ... down_proj), instead of the merged model")
    p.add_argument("--base", help="the Hugging Face folder (GPT-2's, or the Llama family's) or Hub name the --adapter "
                                  "goes on, written as its base_model_name_or_path (default: the run's --init); a "
                                  "folder, or a Hub model in the local cache, must hold the run's frozen weights "
                                  "exactly (a QLoRA run's: quantized as the run did; a run on a GPTQ/AWQ folder's "
                                  "own quantization: that folder; a run on a .gguf file's own blocks: the file's "
                                  "float export, peft loading no .gguf)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a Hugging Face folder (default); gguf: one .gguf file (--out NAME.gguf) for llama.cpp, "
                        "Ollama and LM Studio, a GPT-2, Llama (a Mistral without its window too), Qwen2, Qwen3, Gemma, "
                        "Gemma 2, Gemma 3 or Phi-3 (a partial rotary) with its tokenizer "
                        '(pip install -e ".[gguf]")')
    # (gguf_export.GGUF_TYPES: not imported here, the parser is built before any command runs)
    p.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m",
                                           "q4_k_s", "q5_k_m", "q5_k_s", "q6_k"),
                   default=None,
                   help="--format gguf's matrices: f32, f16 (default), bf16, or ggml's blocks of 32 with an f16 "
                        "scale: q8_0 (8-bit), q4_0, q4_1, q5_0, q5_1 (4 / 5-bit; _1 with an f16 minimum too); or "
                        "llama.cpp's K-quant mixes (blocks of 256): q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, their "
                        "tensors' types as llama-quantize picks them (_m: attn_v and ffn_down Q6_K on some layers). "
                        "The LM head goes as Q6_K (q8_0: Q8_0); rows not whole blocks of 256 fall back as "
                        "llama-quantize does (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K and the head to Q8_0), of 32 to f16; "
                        "norms and biases stay f32. An int8 / int4 model of groups of 32 with fp16 scales (a .gguf "
                        "file kept quantized) is copied into q8_0 / q4_0..q5_1 blocks unrounded")
    p.add_argument("--overwrite", action="store_true", help="replace those files if --out holds them")
    p.set_defaults(func=cmd_export)
