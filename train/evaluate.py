"""`tritongpt eval`: a model's loss, perplexity and bits per byte on a corpus (a reward model's pairwise
accuracy on preference pairs: eval_reward_model).

Default text: a pretraining run's own held-out tail (the checkpoint records its data and how
many tokens it trained on), else the embedded corpus's last 10%. The text is tokenised once
(the same cache pretraining uses) and scored in windows of the model's context. With stride =
context (the default) the windows do not overlap: each token is predicted from the tokens before
it in its own window, so the first tokens of a window see little context. A smaller stride
slides the window and scores only the tokens the previous window did not (Hugging Face's
"perplexity of fixed-length models"): every token but the first window's
sees at least context - stride tokens, at context / stride times the cost.

    loss        mean -ln p(token) over the scored tokens (nats)
    perplexity  exp(loss)
    bits/byte   the summed -log2 p over the UTF-8 bytes the scored tokens spell (special
                tokens, e.g. document separators, spell none): comparable across
                tokenizers, which perplexity per token is not
"""
import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tritongpt.errors import UserError, note
from tritongpt.train.tokenizer import HF_WEIGHTS_HELP, HUB_REPO_HELP, TOKENIZER_CHOICES
from tritongpt.cli import command_help


def windows(n_tokens: int, context: int, stride: int):
    """(begin, end, first_scored) per window over tokens [0, n_tokens): inputs are
    tokens[begin:end], targets tokens[begin + 1:end + 1], of which those at positions
    >= first_scored (absolute, for the target) are scored. Every target position in
    [1, n_tokens) is scored exactly once."""
    if not 1 <= stride <= context:
        raise UserError(f"--stride must be between 1 and the context ({context}), got {stride}")
    out, scored_to = [], 1  # the next target position not yet scored
    begin = 0
    while scored_to < n_tokens:
        end = min(begin + context, n_tokens - 1)
        out.append((begin, end, scored_to))
        scored_to = end + 1
        begin += stride  # stride <= context: the next window still reaches past scored_to
    return out


@torch.no_grad()
def evaluate_tokens(model, tokens, stride=None, batch_size: int = 8, dtype=None, token_bytes=None,
                    progress: bool = False, document_eot: int | None = None,
                    document_bos: int | None = None) -> dict:
    """Score tokens (a 1-D integer array or tensor) with model; see the module docstring.
    dtype: the autocast dtype (bf16, fp16), or fp32 / None for none. document_eot: keep each
    window's documents apart, split at this id, as `pretrain --document-mask` trains; document_bos:
    the tokens' documents are "BOS doc EOS" (data.document_ids: each opened by its BOS).

    token_bytes(ids) -> how many UTF-8 bytes those ids spell (bits per byte needs it). The
    model's own loss is used (model(idx, targets=..., reduction="sum")), so the toggle's path
    (the fused LM head + loss on Triton) is what is measured.
    """
    from tritongpt.train.common import autocast
    from tritongpt.train.data import document_ids

    tokens = torch.as_tensor(tokens).long()
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise UserError(f"evaluation needs at least 2 tokens in one sequence, got shape {tuple(tokens.shape)}")
    ctx = model.config.context_length
    device = next(model.parameters()).device
    spans = windows(tokens.numel(), ctx, ctx if stride is None else stride)
    was_training = model.training
    model.eval()
    # windows of one length batch together (only the ones at the end are shorter)
    batches = []
    for _, same in itertools.groupby(spans, lambda s: s[1] - s[0]):
        same = list(same)
        batches += [same[k:k + batch_size] for k in range(0, len(same), batch_size)]
    total, scored, n_bytes = torch.zeros((), dtype=torch.float64, device=device), 0, 0
    start = time.perf_counter()
    try:
        for group in tqdm(batches, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
            # a window that starts mid-document gets no BOS of its own (as the usual sliding-window
            # perplexity): its tokens are the file's, each document's BOS where the document starts
            idx = torch.stack([tokens[b:e] for b, e, _ in group])
            targets = torch.stack([tokens[b + 1:e + 1] for b, e, _ in group])
            for row, (b, _, first) in enumerate(group):
                targets[row, :first - (b + 1)] = -100  # scored by an earlier window
                if token_bytes is not None:
                    n_bytes += token_bytes(targets[row, first - (b + 1):].tolist())
            scored += int((targets != -100).sum())
            doc_ids = None if document_eot is None else document_ids(idx, document_eot, document_bos).to(device)
            with autocast(device, dtype):
                total += model(idx.to(device), targets=targets.to(device), reduction="sum", doc_ids=doc_ids).double()
    finally:
        model.train(was_training)
    total_nats = float(total)  # one host sync, at the end
    loss = total_nats / scored
    # past float's range (a diverged model: over ~709 nats a token) inf, as lambada reports it, not e^700 made up
    perplexity = math.exp(loss) if loss < math.log(sys.float_info.max) else math.inf
    out = {"tokens": scored, "windows": len(spans), "loss": loss, "perplexity": perplexity,
           "seconds": time.perf_counter() - start}
    if token_bytes is not None:
        out.update(bytes=n_bytes, bits_per_byte=total_nats / math.log(2) / n_bytes if n_bytes else None)
    return out


PRETRAIN_DATA = "pretrain_data"  # a quantized file's metadata (`tritongpt quantize`): pretrain_data of its run, as JSON


def run_data_record(weights):
    """The data record a checkpoint's state.pt keeps (a list, a rank's each), or the one `tritongpt quantize` wrote
    into its file's metadata (PRETRAIN_DATA: its run's pretrain_data; the folder has no state.pt); None where neither
    is."""
    from tritongpt.model.gpt import safetensors_metadata
    from tritongpt.train.common import load_state, resolve_checkpoint

    file = resolve_checkpoint(weights)
    if (file.parent / "state.pt").is_file():
        return load_state(file.parent, mmap=True).get("data")
    if file.suffix != ".safetensors" or PRETRAIN_DATA not in (meta := safetensors_metadata(file)):
        return None
    try:
        return json.loads(meta[PRETRAIN_DATA])
    except ValueError:  # damaged: scored as a bare weights file is
        return None


def pretrain_data(weights) -> dict | None:
    """What a pretraining checkpoint records of its data (source, source_hash, train_tokens: the
    tokens before its held-out tail), or None for other checkpoints and bare weight files; a quantized file carries its
    run's record (run_data_record)."""
    data = run_data_record(weights)
    data = data[0] if isinstance(data, list) and data else data
    if isinstance(data, dict) and "sources" in data:  # a mixture (several --data): no one corpus is the run's
        return {"sources": data["sources"]}
    keys = ("source", "source_hash", "train_tokens")
    return data if isinstance(data, dict) and all(k in data for k in keys) else None


# the flags of a language model's eval that a reward model's has no use for
_LM_ONLY = ("model", "text_field", "stride", "max_tokens", "cache_dir", "document_mask")


def own_tokens(td, run, tok) -> bool:
    """Whether td (data.prepare_tokens with tok) is the pretraining run's own data in the run's own tokenizer (run:
    pretrain_data's record, None for none)."""
    return bool(run) and td.meta.get("source_hash") == run["source_hash"] and \
        run.get("tokenizer_hash", tok.hash) == tok.hash


def own_split(td, run, tok) -> bool:
    """own_tokens, and its documents with the BOS the run had: the run's train_tokens are where its training split
    ended in td.tokens (eval scores the tail after them; GPTQ calibrates on the head before them)."""
    return own_tokens(td, run, tok) and run.get("bos_id") == td.meta.get("bos_id")


def reward_run(weights) -> dict:
    """The flags a `tritongpt reward` checkpoint records of its run (data, num_pairs, val_fraction, seed), or {}
    for other checkpoints (a Hugging Face classifier, a bare weights file)."""
    from tritongpt.train.common import load_state, resolve_checkpoint

    state_dir = resolve_checkpoint(weights).parent
    if not (state_dir / "state.pt").is_file():
        return {}
    args = load_state(state_dir, mmap=True).get("args")  # (only `reward` writes a reward model's state)
    return args if isinstance(args, dict) else {}


def eval_reward_model(args, device, dtype) -> dict:
    """`eval --weights REWARD_MODEL`: how often it scores the chosen answer above the rejected one (accuracy),
    the Bradley-Terry loss and the mean margin r_chosen - r_rejected, on preference pairs: --data's (--split val:
    the pairs `reward --data` holds out at this --val-fraction, by prompt hash; all: every pair), else the embedded
    tasks' held-out pairs (from prompts `reward` never trains on). A `reward` run's own data, --val-fraction,
    --num-pairs and --seed are the defaults, so it is scored on the pairs it held out."""
    from tritongpt.train.chat_template import chat_template_for
    from tritongpt.train.common import autocast, note_slow_kernels
    from tritongpt.train.preference import encode_pairs, read_preference_file, split_pairs, train_val_pairs
    from tritongpt.train.reward import RewardModel, pairwise_metrics
    from tritongpt.train.sft import pick_tokenizer

    given = [f"--{k.replace('_', '-')}" for k in _LM_ONLY if getattr(args, k) is not None]
    if given:
        raise UserError(f"{', '.join(given)}: for a language model's eval; {args.weights} is a reward model, scored "
                        "on preference pairs")
    run = reward_run(args.weights)
    data = args.data if args.data is not None else run.get("data")
    # (a text corpus, as an LM's eval reads, was told "expected a .json ..." by the record reader, with no word
    # of why: said here, before the model loads)
    if data is not None and Path(data).is_file() and Path(data).suffix not in (".json", ".jsonl", ".parquet"):
        raise UserError(f"--data {data}: {args.weights} is a reward model, scored on preference pairs, not text: "
                        "expected a .json list, .jsonl or .parquet file of {\"prompt\", \"chosen\", \"rejected\"} "
                        "records (\"instruction\" and \"input\" in place of \"prompt\" too), as `reward --data` takes")
    fraction = args.val_fraction if args.val_fraction is not None else run.get("val_fraction", 0.1)
    rm = RewardModel.load(args.weights, map_location=device, kernels=args.kernels, quantized_ok=True).eval()
    note_slow_kernels([rm], device)
    tok = pick_tokenizer(args.tokenizer, args.weights, rm.config.vocab_size)
    if data is None:  # the tasks' val split: prompts the train split never has (--split all: the same)
        pairs = train_val_pairs(None, run.get("num_pairs", 2000), fraction, run.get("seed", 0))[1]
    elif args.split == "all":
        pairs = read_preference_file(data)
    else:
        pairs = split_pairs(read_preference_file(data), fraction)[1]
    if not pairs:
        raise UserError(f"--val-fraction {fraction:g} holds out none of the pairs of {data or 'the embedded tasks'}"
                        f"{' (the run held none out)' if args.val_fraction is None and run else ''}: pass a "
                        "--val-fraction, or --data with --split all")
    tok = chat_template_for(tok, "reward", None, any(p.format == "chat" for p in pairs))
    encoded = encode_pairs(pairs, tok, rm.config.context_length)
    if not encoded:
        raise UserError(f"no pair of {data or 'the embedded tasks'} fits the reward model's context "
                        f"({rm.config.context_length} tokens)")
    with torch.no_grad(), autocast(device, dtype):
        result = pairwise_metrics(rm, encoded, tok.eot_id, args.batch_size)
    return {"pairs": len(encoded), **result, "weights": str(args.weights),
            "data": str(data or "embedded tasks"), "split": "val" if data is None else args.split,
            "val_fraction": fraction, "tokenizer": tok.name, "kernels": sorted(rm.backbone.kernels) or ["reference"],
            "device": str(device)}


def cmd_eval(args):
    from tritongpt.commands import quantize
    from tritongpt.train import data
    from tritongpt.train.common import json_report, note_slow_kernels, pick_device, pick_dtype
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.reward import is_reward_model
    from tritongpt.train.sft import pick_tokenizer

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.split == "all" and args.val_fraction is not None:  # (an LM's and a reward model's: it would do nothing)
        raise UserError("--val-fraction sizes the held-out split that --split val scores; --split all scores the "
                        "whole of the data: pass one of them")
    if is_reward_model(args.weights):
        if args.quantize or args.group_size is not None:
            flag = "--quantize" if args.quantize else "--group-size"
            raise UserError(f"{flag} quantizes a language model for its perplexity; a reward model is scored as it "
                            "is")
        device = pick_device(args.device)
        result = eval_reward_model(args, device, pick_dtype(args.dtype, device))
        if args.json:
            print(json_report(result))
        else:
            print(f"{result['pairs']:,} preference pairs of {result['data']} ({result['split']}): accuracy "
                  f"{result['acc']:.4f}, loss {result['loss']:.4f}, mean margin {result['margin']:.4f}")
        return 0
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UserError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    fraction = 0.1 if args.val_fraction is None else args.val_fraction
    if args.split == "val" and not 0.0 < fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1) with --split val, got {args.val_fraction}")
    device = pick_device(args.device)
    model = load_checkpoint(args.weights, args.model, quantized_ok=True)
    quantize(model, args, device)  # before the move: the float matrices go to the device one at a time
    model.to(device)
    model.set_kernels(args.kernels)
    note_slow_kernels([model], device)  # as generate says it: the windows wait on the interpreter
    tok = pick_tokenizer(args.tokenizer, args.weights, model.config.vocab_size)
    run = pretrain_data(args.weights)
    if run and "sources" in run:
        if args.data is None:
            raise UserError(f"{args.weights} was trained on a mixture of {len(run['sources'])} sources "
                            f"({', '.join(str(s.get('source')) for s in run['sources'])}): pass --data, one of them")
        run = None  # its sources' splits are not compared: --data is scored as given
    source = args.data if args.data is not None else (run["source"] if run else None)
    data.check_text_field(source, args.text_field)
    # the run's own .jsonl data is read from the field it trained on (checkpoints from before
    # the field was recorded: "text")
    own_field = run.get("text_field") if run and args.data is None else None
    text_field = args.text_field or own_field or "text"
    try:
        td = data.prepare_tokens({"source": source, "text_field": text_field}, tok, cache_dir=args.cache_dir,
                                 val_fraction=args.val_fraction if args.split == "val" else None)
    except UserError as e:
        if args.data is not None or not run:
            raise
        raise UserError(f"{e}; it is the data the run of {args.weights} trained on: pass --data") from None
    if args.split == "all":
        tokens = td.head(args.max_tokens)
    elif td.tokens is None:  # a nanoGPT folder: its val.bin is the held-out split, a run's own too
        tokens = td.val
    elif own_split(td, run, tok):
        # the run's own split, unless --val-fraction asks for another
        start = run["train_tokens"] if args.val_fraction is None else len(td.train)
        tokens = td.tokens[start:]
        if start < run["train_tokens"]:
            note(f"this val split starts at token {start:,}, inside the {run['train_tokens']:,} tokens "
                 "the model was trained on; without --val-fraction eval scores the run's own held-out tail")
    else:
        if own_tokens(td, run, tok):
            then, now = ("no BOS" if i is None else f"BOS id {i}" for i in (run.get("bos_id"), td.meta.get("bos_id")))
            note(f"the run of {args.weights} trained on these documents with {then} before each, the tokenizer now "
                 f"puts {now} (runs from before tritongpt wrote a BOS had none): its held-out tail is not where it "
                 f"was, so the last {fraction:g} is scored")
        tokens = td.val
        if not len(td.train):
            raise UserError(f"--val-fraction {fraction} leaves no tokens before the val split: use --split all")
    if args.max_tokens is not None:
        tokens = tokens[:args.max_tokens]
    if len(tokens) < 2:
        raise UserError(f"the {args.split} split of {source or 'pydoc'} has {len(tokens)} tokens: "
                        "too few to score (a larger --val-fraction, or --split all)")
    specials = set(tok.special_tokens.values())  # document separators: no text, no bytes

    def text_bytes(ids):
        return len(tok.decode_bytes([i for i in ids if i not in specials]))

    # a run trained with its documents kept apart is scored so, unless the flag says otherwise
    document_mask = bool(run and run.get("document_mask")) if args.document_mask is None else args.document_mask
    result = evaluate_tokens(model, torch.from_numpy(tokens.astype("int64")), args.stride, args.batch_size,
                             pick_dtype(args.dtype, device), text_bytes, progress=not args.json,
                             document_eot=tok.eot_id if document_mask else None, document_bos=td.meta.get("bos_id"))
    result.update(weights=str(args.weights), data=str(source or "pydoc"), split=args.split,
                  document_mask=document_mask,
                  tokenizer=tok.name, context=model.config.context_length,
                  stride=args.stride or model.config.context_length, kernels=sorted(model.kernels) or ["reference"],
                  device=str(device), quantize=getattr(model, "quantized", None),
                  quantize_group_size=getattr(model, "quantized_group_size", None))
    if args.json:
        print(json_report(result))
    else:
        bpb = result.get("bits_per_byte")
        print(f"{result['tokens']:,} tokens of {result['data']} ({args.split}) in {result['windows']} windows of "
              f"{result['context']} (stride {result['stride']}): loss {result['loss']:.4f}, perplexity "
              f"{result['perplexity']:.2f}, {'-' if bpb is None else f'{bpb:.4f}'} bits/byte "
              f"({'documents kept apart, ' if document_mask else ''}{result['seconds']:.1f} s)")
    return 0


def add_cli(sub):
    from tritongpt.commands import add_model_args, add_quantize_arg

    p = sub.add_parser("eval", help=command_help("eval"),
                       description=__doc__.split("\n\n")[0])
    add_model_args(p, default_model=None, default_text="what --weights holds")
    p.add_argument("--weights", required=True,
                   help="tritongpt checkpoint (file, checkpoint or run folder), " + HF_WEIGHTS_HELP + ", or "
                        + HUB_REPO_HELP +
                        "; a reward model (a `tritongpt reward` run, or a Hugging Face "
                        "<Family>ForSequenceClassification) is scored on preference pairs instead: accuracy, "
                        "Bradley-Terry loss, mean margin")
    p.add_argument("--data", default=None, help="a file, a folder of .txt files, a .jsonl or .parquet file, a .bin "
                                                "of uint16 token ids or a folder with train.bin and val.bin "
                                                "(nanoGPT's), or 'pydoc' / "
                                                "'stdlib' (default: a pretraining run's own data, else the "
                                                "embedded pydoc corpus); for a reward model, a preference file "
                                                "as `reward --data` takes (default: the embedded tasks' "
                                                "held-out pairs)")
    p.add_argument("--text-field", default=None, help="field holding the text in .jsonl rows or a .parquet's "
                                                      "column (default: the one a pretraining run's own data was "
                                                      "read from, else text)")
    p.add_argument("--split", choices=("val", "all"), default="val",
                   help="val: the held-out tail (a pretraining run's own, on its data; a nanoGPT folder's "
                        "val.bin; else --val-fraction); "
                        "all: every token (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="the held-out tail's share, as pretrain's (default: the run's split, else 0.1)")
    p.add_argument("--tokenizer", help=TOKENIZER_CHOICES + " (default: the one saved with "
                                       "--weights, else by vocab size)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts; smaller scores each token with more context "
                        "(default: the context, no overlap)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the split")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 autocast on CUDA, fp16 on GPUs before Ampere, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--cache-dir", default=None, help="where the tokenised corpus is cached (as pretrain's)")
    p.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each window's documents apart (split at <|endoftext|>), as `pretrain "
                        "--document-mask` trains (default: as the --weights run trained, else not)")
    add_quantize_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)
