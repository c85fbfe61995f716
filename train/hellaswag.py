"""`tritongpt hellaswag`: multiple-choice accuracy on HellaSwag (Zellers et al., 2019), the
common-sense benchmark nanoGPT's successors (build-nanogpt, llm.c) track while pretraining GPT-2.

Each example is a context and four endings, one of them right. The model does not generate:
each ending is scored by the loss of its tokens after the context, and the likeliest ending is
its answer (nothing to parse, so even a small model gets a number that moves):

    acc       the ending with the lowest summed loss
    acc_norm  the ending with the lowest mean loss per token (longer endings are not penalised
              for their length: build-nanogpt's and llm.c's figure; they give about 0.295 for
              GPT-2 124M)

An example is one row per ending: context + " " + ending, with only the ending's targets
counted; --batch-size examples go through one forward, right-padded. A row longer than the
model's context keeps its last tokens. A tokenizer whose own pipeline starts every text with a BOS
(Gemma's, Llama 2's and 3's) gets it before the context, as transformers' tokenizer(ctx) gives it
(Gemma without it is much worse).

--data also reads other multiple-choice benchmarks as the Hugging Face Hub has them (.jsonl, .json or
.parquet; the shape told by the first record's fields, a record of another shape refused):
allenai/ai2_arc and allenai/openbookqa (question or question_stem, choices {text, label}, answerKey),
ybisk/piqa (goal, sol1, sol2, label) and cais/mmlu-style (question, choices, answer). Their context is
lm-eval-harness's cloze prompt "Question: {question}\nAnswer:", the choices the endings. acc_norm is
still the mean loss per token, as for HellaSwag, not lm-eval's per-byte normalisation (acc_norm on
ARC, OpenBookQA and PIQA there), so it will not match lm-eval's acc_norm exactly; acc is comparable.

allenai/winogrande's records (sentence with one "_", option1, option2, answer "1" or "2") are scored as
lm-eval-harness's winogrande task does, the other way round: each option fills the blank and ends its own
context, sentence[:i] + option, and the rest of the sentence, " " + sentence[i + 1:].strip(), is the one ending
scored after both; the option after which it is likelier is the answer. acc alone: the two choices share their
ending, so a mean per token ranks them as the sum does (lm-eval reports acc alone too). The output names the
benchmark read ("WinoGrande: ... acc"); HellaSwag's own keeps "hellaswag:".
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tritongpt.errors import UserError
from tritongpt.train.tokenizer import HF_WEIGHTS_HELP, HUB_REPO_HELP, TOKENIZER_CHOICES
from tritongpt.cli import command_help

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


def fetch_once(url: str, name: str, what: str, flag: str, cache_dir=None) -> Path:
    """The file at `url`, fetched once into the tritongpt cache as `name` (a path under it) and read from there
    after; written whole or not at all (a download cut short leaves nothing to be taken for the file). `what`
    names it and `flag` the calling command's flag for a local copy instead, when the fetch fails (offline)."""
    import os
    import urllib.request

    from tritongpt.train.tokenizer import default_cache_dir

    path = default_cache_dir(cache_dir) / name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        urllib.request.urlretrieve(url, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not download {what} from {url} (offline?): {e}; pass {flag} with the "
                        f"{path.name} file") from None
    os.replace(tmp, path)
    return path


def download(cache_dir=None, flag: str = "--data") -> Path:
    """The validation split (10,042 examples, ~11 MB), fetched once into the tritongpt cache;
    `flag`: the calling command's flag for the file instead (named when offline)."""
    return fetch_once(URL, "hellaswag/hellaswag_val.jsonl", "HellaSwag", flag, cache_dir)


PROMPT = "Question: {}\nAnswer:"  # lm-eval-harness's ARC, PIQA and MMLU-style cloze prompt


def _text(row, field, where, what="text"):
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{field}' must be the {what}, got {value!r}")
    return value


def _texts(value, field, where, what="texts"):
    if not (isinstance(value, list) and len(value) >= 2 and all(isinstance(e, str) and e.strip() for e in value)):
        raise UserError(f"{where}: '{field}' must be a list of at least 2 {what}, got {value!r}")
    return value


def _index(label, n, field, where):
    if isinstance(label, str) and label.strip().isdigit():  # Hugging Face's Rowan/hellaswag: "0".."3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
        raise UserError(f"{where}: '{field}' must be the index of the right ending (0..{n - 1}), got {label!r}")
    return label


def _hellaswag(row, where):
    ctx, endings = _text(row, "ctx", where, "context text"), _texts(row.get("endings"), "endings", where)
    return {"ctx": ctx, "endings": endings, "label": _index(row.get("label"), len(endings), "label", where)}


def _arc(row, where):  # ARC, and OpenBookQA's question_stem
    q = _text(row, "question_stem" if "question_stem" in row else "question", where, "question text")
    choices = row.get("choices")
    if not isinstance(choices, dict):
        raise UserError(f"{where}: 'choices' must be an object with 'text' and 'label' lists, got {choices!r}")
    endings = _texts(choices.get("text"), "choices.text", where)
    labels = choices.get("label")
    if not (isinstance(labels, list) and len(labels) == len(endings) and all(isinstance(k, str) for k in labels)):
        raise UserError(f"{where}: 'choices.label' must be a list of {len(endings)} labels (one a text), "
                        f"got {labels!r}")
    key = row.get("answerKey")
    if not isinstance(key, str) or key.strip() not in labels:
        raise UserError(f"{where}: 'answerKey' must be one of the choices' labels {labels}, got {key!r}")
    return {"ctx": PROMPT.format(q), "endings": endings, "label": labels.index(key.strip())}


def _piqa(row, where):
    endings = [_text(row, "sol1", where, "first solution"), _text(row, "sol2", where, "second solution")]
    return {"ctx": PROMPT.format(_text(row, "goal", where, "goal text")), "endings": endings,
            "label": _index(row.get("label"), 2, "label", where)}


def _mmlu(row, where):
    endings = _texts(row.get("choices"), "choices", where, "choice texts")
    q = _text(row, "question", where, "question text")
    return {"ctx": PROMPT.format(q), "endings": endings,
            "label": _index(row.get("answer"), len(endings), "answer", where)}


def _winogrande(row, where):
    """lm-eval-harness's partial scoring: each option fills the blank and ends its context, and the rest of the
    sentence after the blank is the one ending both are scored on (its likelihood given each context)."""
    sentence = _text(row, "sentence", where, "sentence")
    if sentence.count("_") != 1:
        raise UserError(f"{where}: 'sentence' must have one '_' (the blank an option fills), got {sentence!r}")
    i = sentence.index("_")
    ending = sentence[i + 1:].strip()
    if not ending:
        raise UserError(f"{where}: 'sentence' must go on after its '_' (the ending scored), got {sentence!r}")
    options = [_text(row, "option1", where, "first option"), _text(row, "option2", where, "second option")]
    answer = row.get("answer")
    if not (isinstance(answer, str) and answer.strip() in ("1", "2")):  # the Hub's strings; "" in its test split
        raise UserError(f"{where}: 'answer' must be \"1\" or \"2\" (the right option), got {answer!r}")
    return {"ctxs": [sentence[:i] + option for option in options], "ending": ending, "label": int(answer) - 1}


# shape: (the fields that mark a record as one, its reader -> an example: {ctx, endings, label}, or WinoGrande's
# {ctxs, ending, label})
SHAPES = {"HellaSwag": (("ctx", "endings"), _hellaswag),
          "ARC/OpenBookQA": (("answerKey", "question_stem"), _arc),
          "PIQA": (("goal", "sol1", "sol2"), _piqa),
          "WinoGrande": (("option1", "option2"), _winogrande),
          "MMLU": (("answer",), _mmlu)}


def _shapes(row) -> list:
    found = [name for name, (marks, _) in SHAPES.items() if any(m in row for m in marks)]
    if "WinoGrande" in found and "MMLU" in found:  # WinoGrande's records have an answer too: not MMLU's mark there
        found.remove("MMLU")
    return found


def read_examples(path, what: str = "HellaSwag file") -> list:
    """A multiple-choice file's examples (read_shaped)."""
    return read_shaped(path, what)[1]


def read_shaped(path, what: str = "multiple-choice file") -> tuple:
    """A multiple-choice file (.jsonl, .json or .parquet) as (its shape's name, its examples), the shape
    (SHAPES) told by the first record's fields: HellaSwag's ctx, endings, label; ARC's and OpenBookQA's
    question (or question_stem), choices {text, label} and answerKey; PIQA's goal, sol1, sol2, label;
    WinoGrande's sentence, option1, option2, answer; MMLU's question, choices (texts), answer. An example is
    {ctx, endings, label}, one context and its endings; WinoGrande's is {ctxs, ending, label}, a context an
    option and one ending (rows()). Other fields are ignored; a record of another shape is refused. `what`
    names the file when it is missing."""
    from tritongpt.train.sft import read_json_records

    examples, shape = [], None
    for where, row in read_json_records(path, what):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
        found = _shapes(row)
        if shape is None:
            if len(found) != 1:
                raise UserError(f"{where}: not a record of one known shape (fields {sorted(row)}; read: HellaSwag's "
                                "ctx/endings/label, ARC's question/choices/answerKey, OpenBookQA's question_stem/"
                                "choices/answerKey, PIQA's goal/sol1/sol2/label, WinoGrande's sentence/option1/"
                                "option2/answer, MMLU's question/choices/answer)")
            shape = found[0]
        elif found and shape not in found:
            raise UserError(f"{where}: a record of {'/'.join(found)}'s shape (fields {sorted(row)}) in a file of "
                            f"{shape}'s: one benchmark a file")
        examples.append(SHAPES[shape][1](row, where))
    return shape, examples


def rows(example: dict) -> list:
    """(context, ending) per choice: one context and each ending (HellaSwag and the others), or each context
    and the one ending (WinoGrande's {ctxs, ending}); the choice's score is its ending's loss after its context."""
    if "ctxs" in example:
        return [(ctx, example["ending"]) for ctx in example["ctxs"]]
    return [(example["ctx"], ending) for ending in example["endings"]]


def render(example: dict, tok, context: int):
    """The rows of one example (rows()): (inputs [E, T], targets [E, T]) with -100 wherever a target is
    not one of the ending's tokens (the BOS, the context, the padding)."""
    from tritongpt.train.formats import with_bos

    rows_, starts = [], []
    for text, ending in rows(example):
        ctx = with_bos(tok, tok.encode(text, allowed_special="none"))
        end = tok.encode(" " + ending, allowed_special="none")  # endings follow the context after a space
        row = (ctx + end)[-(context + 1):]  # one more than the context: inputs and targets overlap
        rows_.append(row)
        starts.append(len(row) - len(end))   # the first target that is the ending's (may be cut: < 0)
    width = max(map(len, rows_)) - 1
    inputs = torch.zeros(len(rows_), width, dtype=torch.long)
    targets = torch.full((len(rows_), width), -100, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows_, starts)):
        inputs[i, :len(row) - 1] = torch.tensor(row[:-1])
        first = max(start, 1) - 1             # target position t predicts row[t + 1]
        targets[i, first:len(row) - 1] = torch.tensor(row[first + 1:])
    return inputs, targets


def ending_losses(model, tok, examples, batch_size: int = 8, dtype=None, progress: bool = False,
                  greedy: bool = False, desc: str = "hellaswag"):
    """Per example, in order: the summed and the mean loss of each ending's tokens after its
    context (two float64 CPU tensors [endings]), from the model's own loss, so the kernel toggle's
    path is what is measured. batch_size examples (each its endings' rows) go through one forward,
    right-padded: causal attention keeps the padding out of the scored positions.

    greedy: a third tensor [endings], True where every token of the ending is the argmax after the tokens
    before it (LAMBADA's accuracy). That needs the logits, which the fused Triton loss never makes whole:
    the LM head then runs on the scored positions' hidden states alone, and the loss is their log-softmax."""
    from tritongpt.train.common import autocast

    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for k in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch", disable=not progress,
                      file=sys.stderr):
            rows = [render(ex, tok, model.config.context_length) for ex in examples[k:k + batch_size]]
            width = max(inputs.shape[1] for inputs, _ in rows)
            inputs = torch.cat([F.pad(i, (0, width - i.shape[1])) for i, _ in rows]).to(device)
            targets = torch.cat([F.pad(t, (0, width - t.shape[1]), value=-100) for _, t in rows]).to(device)
            counted = targets != -100
            with torch.no_grad(), autocast(device, dtype):
                if greedy:
                    logits = model.logits(model.hidden(inputs)[counted]).float()
                    want = targets[counted]
                    losses = torch.zeros(targets.shape, dtype=torch.float64, device=device)
                    losses[counted] = -torch.log_softmax(logits, dim=-1).gather(1, want[:, None])[:, 0].double()
                    hit = torch.ones(targets.shape, dtype=torch.bool, device=device)
                    hit[counted] = logits.argmax(dim=-1) == want
                else:
                    losses = model(inputs, targets=targets, reduction="none").double()
            total = losses.sum(dim=1)
            mean = total / counted.sum(dim=1)
            sizes = [i.shape[0] for i, _ in rows]
            out = [total.cpu().split(sizes), mean.cpu().split(sizes)]  # one sync a batch
            if greedy:
                out.append(hit.all(dim=1).cpu().split(sizes))
            yield from zip(*out)
    finally:
        model.train(was_training)


def score(model, tok, examples, batch_size: int = 8, dtype=None, progress: bool = False,
          rank: int = 0, world_size: int = 1) -> dict:
    """acc and acc_norm of `model` on `examples` (see the module docstring; WinoGrande's examples, whose
    choices share their ending, acc alone: the mean loss would rank them as the sum does). Under
    torch.distributed (world_size > 1, called on every rank) each rank scores every world_size-th
    example, as build-nanogpt shares them, and the counts are summed over the ranks: each rank
    returns the figures of all the examples."""
    start, right, right_norm = time.perf_counter(), 0, 0
    mine = examples[rank::world_size]
    desc = "winogrande" if examples and "ctxs" in examples[0] else "hellaswag"
    for i, (total, mean) in enumerate(ending_losses(model, tok, mine, batch_size, dtype, progress, desc=desc)):
        right += int(total.argmin()) == mine[i]["label"]
        right_norm += int(mean.argmin()) == mine[i]["label"]
    if world_size > 1:
        import torch.distributed as dist

        counts = torch.tensor([right, right_norm], dtype=torch.long, device=next(model.parameters()).device)
        dist.all_reduce(counts)  # NCCL's tensors live on the rank's GPU
        right, right_norm = counts.tolist()
    n = len(examples)
    result = {"examples": n, "acc": right / n, "acc_norm": right_norm / n, "seconds": time.perf_counter() - start}
    if desc == "winogrande":
        del result["acc_norm"]
    return result


def check_counts(limit, limit_flag: str, batch_size: int) -> None:
    """hellaswag's and lambada's --max-examples/--limit and --batch-size, before any work."""
    if limit is not None and limit < 1:
        raise UserError(f"{limit_flag} must be at least 1, got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")


def load_scorer(args):
    """(model on its device with --kernels and --quantize, tokenizer, device, dtype) for hellaswag's and lambada's
    scoring."""
    from tritongpt.commands import quantize
    from tritongpt.train.common import note_slow_kernels, pick_device, pick_dtype
    from tritongpt.train.sft import load_init_model, pick_tokenizer

    device = pick_device(args.device)
    model = load_init_model(args.weights, args.model, quantized_ok=True)
    quantize(model, args, device)  # before the move: the float matrices go to the device one at a time
    model.to(device).set_kernels(args.kernels)
    note_slow_kernels([model], device)  # as generate says it: a benchmark's examples wait on the interpreter
    tok = pick_tokenizer(args.tokenizer, args.weights, model.config.vocab_size)
    return model, tok, device, pick_dtype(args.dtype, device)


def run_facts(args, model, tok, device, url: str) -> dict:
    """What a scoring result is of (its --json record): the weights, data, tokenizer, kernels, device, quantization."""
    return dict(weights=str(args.weights), data=str(args.data or url), tokenizer=tok.name,
                kernels=sorted(model.kernels) or ["reference"], device=str(device),
                quantize=getattr(model, "quantized", None),
                quantize_group_size=getattr(model, "quantized_group_size", None))


def check_cache_dir(args):
    """--cache-dir (where the downloaded file is kept) with --data FILE, which downloads nothing: refused."""
    if args.cache_dir is not None and args.data is not None:
        raise UserError(f"--cache-dir keeps the downloaded file; with --data {args.data} nothing is downloaded: pass "
                        "one of them")


def cmd_hellaswag(args):
    check_counts(args.max_examples, getattr(args, "limit_flag", "--max-examples"), args.batch_size)
    check_cache_dir(args)
    if args.data is None:
        shape, examples = read_shaped(download(args.cache_dir), "HellaSwag file")
    else:
        shape, examples = read_shaped(args.data)
    examples = examples[:args.max_examples]
    model, tok, device, dtype = load_scorer(args)
    result = score(model, tok, examples, args.batch_size, dtype, progress=not args.json)
    result.update(benchmark=shape, **run_facts(args, model, tok, device, URL))
    if args.json:
        from tritongpt.train.common import json_report

        print(json_report(result))
    else:
        # HellaSwag's own line as before; another benchmark's file is named by its shape
        name = "hellaswag" if shape == "HellaSwag" else shape
        norm = (f"acc_norm {result['acc_norm']:.4f}" if "acc_norm" in result else
                "no acc_norm: both options are scored on one ending")
        print(f"{name}: {result['examples']:,} examples: acc {result['acc']:.4f}, {norm} "
              f"({result['seconds']:.1f} s)")
    return 0


class CountArg(argparse.Action):
    """--max-examples / --limit (one count, two names): the value, and the name typed (limit_flag), so that a bad
    count is refused by the flag the user wrote, not its alias."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        namespace.limit_flag = option_string


def add_scoring_args(p, data_help: str, limit_flags, limit_help: str, batch_help: str):
    """hellaswag's and lambada's flags: the model, --data, the count, the batch, the tokenizer, dtype, cache, JSON."""
    from tritongpt.commands import add_dtype_arg, add_model_args, add_quantize_arg

    add_model_args(p, default_model=None, default_text="what --weights holds")
    p.add_argument("--weights", required=True,
                   help="tritongpt checkpoint (file, checkpoint or run folder; an int8 or int4 one of `tritongpt "
                        "quantize` too), " + HF_WEIGHTS_HELP + ", a GPT-2 or GPT-Neo name (gpt2-small, "
                        "gpt-neo-125m ...: downloads the weights), or " + HUB_REPO_HELP)
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument(*limit_flags, type=int, default=None, action=CountArg, help=limit_help)
    p.add_argument("--batch-size", type=int, default=8, help=batch_help + " (default %(default)s)")
    p.add_argument("--tokenizer", help=TOKENIZER_CHOICES + " (default: the one saved with "
                                       "--weights, else gpt2 for a 50257 vocab)")
    add_dtype_arg(p)
    add_quantize_arg(p)
    p.add_argument("--cache-dir", default=None, help="where the downloaded file is kept (default: ~/.cache/tritongpt "
                                                     "or $TRITONGPT_CACHE)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_cli(sub):
    p = sub.add_parser("hellaswag", help=command_help("hellaswag"),
                       description=__doc__.split("\n\n")[0])
    add_scoring_args(p, "HellaSwag .jsonl (ctx, endings, label per line; default: the validation split, "
                        "downloaded once into the cache), or an ARC / OpenBookQA (question or question_stem, "
                        "choices, answerKey), PIQA (goal, sol1, sol2, label) or MMLU-style (question, choices, "
                        "answer) .jsonl, .json or .parquet, prompted 'Question: ...\\nAnswer:' as lm-eval-harness "
                        "does (acc_norm: per token, not lm-eval's per byte), or a WinoGrande one (sentence, option1, "
                        "option2, answer), scored as lm-eval's partial scoring does (acc only)",
                     ("--max-examples", "--limit"), "score only the first N examples",
                     "examples per forward, each its endings' rows")
    p.set_defaults(func=cmd_hellaswag)
