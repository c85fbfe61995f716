"""`tritongpt lambada`: LAMBADA (Paperno et al., 2016), the zero-shot benchmark GPT-2's paper reports,
scored as lm-eval-harness's `lambada_openai` task scores it.

Each text is a passage whose last word a reader can only guess from the whole passage. The data is
OpenAI's detokenized test split (5,153 texts; the Hub's EleutherAI/lambada_openai, config default, is the
same records), scored as lm-eval's task yaml says:

    context   text.rsplit(" ", 1)[0]          (lm-eval: text.split(' ')[:-1] joined with ' ')
    target    " " + the last word             (the space kept with the word, as GPT-2's BPE reads it)
    acc       the share of texts whose every target token is the model's greedy argmax after the
              tokens before it (lm-eval's is_greedy)
    perplexity  exp(-mean over texts of the target's summed log-likelihood) (lm-eval's perplexity:
              per text, not per token)

lm-eval-harness reports about acc 0.33 and perplexity 40 for GPT-2 124M (GPT-2's paper, 46% and 35.1,
scored its own way: not comparable). The context and the target are tokenized apart (HellaSwag's rows:
hellaswag.render); lm-eval tokenizes context + target whole and splits at the context's length, which is the
same ids for GPT-2's BPE (a space starts a new pre-token) but may differ by a merge for a SentencePiece
tokenizer. A tokenizer whose pipeline starts every text with a BOS (Gemma's, Llama's) gets it before the
context, as for HellaSwag (lm-eval adds one for Gemma, else only when told to). A context longer than the
model's context window loses its first tokens (left-truncated, as lm-eval does); the target is kept whole (one
longer than the window is refused).
Texts are batched, right-padded; the logits are made only at the target's positions.
"""
import sys

from tritongpt.errors import UserError
from tritongpt.cli import command_help

URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"


def download(cache_dir=None, flag: str = "--data"):
    """OpenAI's LAMBADA test split (5,153 texts, ~1.8 MB), fetched once into the tritongpt cache."""
    from tritongpt.train.hellaswag import fetch_once

    return fetch_once(URL, "lambada/lambada_test.jsonl", "LAMBADA", flag, cache_dir)


def split_text(text: str, where: str) -> tuple:
    """(context, target) of a text as lm-eval's lambada_openai cuts it: the last word after the last space,
    with that space (the target), and all before it (the context)."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: 'text' must be the passage, got {text!r}")
    if " " not in text:
        raise UserError(f"{where}: 'text' has no space, so no last word to predict: {text[:80]!r}")
    context, word = text.rsplit(" ", 1)
    if not word:
        raise UserError(f"{where}: 'text' ends with a space, so no last word to predict: {text[-80:]!r}")
    if not context:
        raise UserError(f"{where}: 'text' has nothing before its last word to predict it from: {text!r}")
    return context, " " + word


def read_texts(path, what: str = "LAMBADA file") -> list:
    """A LAMBADA file (.jsonl as OpenAI's, .json, .parquet as the Hub's, or a folder of .parquet shards) as
    {ctx, target} examples, a record's `text` cut by split_text; other fields are ignored."""
    from tritongpt.train.sft import read_json_records

    examples = []
    for where, row in read_json_records(path, what):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object with a 'text' field, got {type(row).__name__}")
        if "text" not in row:
            raise UserError(f"{where}: no 'text' field (fields {sorted(row)}); a LAMBADA record is "
                            "{\"text\": passage}")
        ctx, target = split_text(row["text"], where)
        examples.append({"ctx": ctx, "target": target})
    return examples


def score(model, tok, examples, batch_size: int = 8, dtype=None, progress: bool = False) -> dict:
    """acc and perplexity of `model` on `examples` (see the module docstring), through hellaswag's batching:
    each text one row, its target the one ending (hellaswag.render adds the space: the target without it)."""
    import math
    import time

    from tritongpt.train.hellaswag import ending_losses

    start, right, nll = time.perf_counter(), 0, 0.0
    context = model.config.context_length
    for ex in examples:  # hellaswag.render would score such a target's tail alone, as if it were the whole
        n = len(tok.encode(ex["target"], allowed_special="none"))
        if n > context:
            raise UserError(f"the last word {ex['target'][1:41]!r} is {n} tokens, longer than the model's context "
                            f"({context}): it cannot be scored whole")
    rows = [{"ctx": ex["ctx"], "endings": [ex["target"][1:]]} for ex in examples]
    for total, _, greedy in ending_losses(model, tok, rows, batch_size, dtype, progress, greedy=True,
                                          desc="lambada"):
        right += bool(greedy[0])
        nll += float(total[0])
    n = len(examples)
    # past float's range (a mean of over 709 nats a text: an untrained model, long last words) it is inf, as
    # torch.exp would say, not math.exp's OverflowError
    ppl = math.exp(nll / n) if nll / n < math.log(sys.float_info.max) else math.inf
    return {"examples": n, "acc": right / n, "perplexity": ppl, "seconds": time.perf_counter() - start}


def cmd_lambada(args):
    from tritongpt.train.hellaswag import check_cache_dir, check_counts, load_scorer, run_facts

    check_counts(args.limit, getattr(args, "limit_flag", "--limit"), args.batch_size)
    check_cache_dir(args)
    if args.data is None:
        examples = read_texts(download(args.cache_dir))
    else:
        examples = read_texts(args.data, "LAMBADA --data file")
    examples = examples[:args.limit]
    model, tok, device, dtype = load_scorer(args)
    result = score(model, tok, examples, args.batch_size, dtype, progress=not args.json)
    result.update(run_facts(args, model, tok, device, URL))
    if args.json:
        from tritongpt.train.common import json_report

        print(json_report(result))
    else:
        print(f"lambada: {result['examples']:,} examples: acc {result['acc']:.4f}, perplexity "
              f"{result['perplexity']:.2f} ({result['seconds']:.1f} s)")
    return 0


def add_cli(sub):
    from tritongpt.train.hellaswag import add_scoring_args

    p = sub.add_parser("lambada", help=command_help("lambada"), description=__doc__.split("\n\n")[0])
    add_scoring_args(p, "LAMBADA texts: a .jsonl, .json or .parquet file (or a folder of .parquet shards) of records "
                        "with a 'text' field, or a Hugging Face Hub dataset id (EleutherAI/lambada_openai/default: "
                        "its test split); default: OpenAI's test split, downloaded once into the cache",
                     ("--limit", "--max-examples"), "score only the first N texts", "texts per forward")
    p.set_defaults(func=cmd_lambada)
