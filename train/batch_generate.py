"""Offline batched generation, as vLLM's `LLM.generate(prompts, SamplingParams)`: every prompt of a list through
the continuous-batching engine (train/engine.py), the results in the input order. Each prompt is one engine request,
so its tokens are generate()'s for it alone whatever --max-batch is (the engine's promise).

    outs = generate_batch(model, [ids_a, ids_b], 32, max_batch=16, seed=1337, temperature=0.8, eos_id=eot)

`tritongpt generate --prompts FILE --out results.jsonl` is its command (cmd_generate_prompts).
"""
import json
import sys
import time
from pathlib import Path

from tritongpt._types import is_int
from tritongpt.errors import EngineDown, UserError, note, read_text_file

# a --prompts record's fields: the prompt and the settings it may give over the command's flags (vLLM's names;
# "model": a --lora-modules adapter's name, as a serve request's)
# "structured_outputs" / "response_format": a serve request's (train/structured.py), over --structured-outputs
RECORD_FIELDS = ("prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "model", "structured_outputs",
                 "response_format")


def generate_batch(model, prompts, max_new_tokens, max_batch: int = 32, kv_pages: int | None = None,
                   page_size: int = 16, kv_cache_dtype: str = "auto", autocast=None, cuda_graph: bool = False,
                   seed: int | None = None, each=None, on_done=None, prefix_caching: bool = False, names=None,
                   stats: dict | None = None, max_prefill_tokens: int | None = None, prompt_lookup: int | None = None,
                   num_draft_tokens: int | None = None, max_loras: int | None = None, draft=None,
                   **settings) -> list:
    """Every prompt through one Engine(model, max_batch, ...): prompts, a list of [n, T] id tensors (n samples of
    the prompt, drawn as generate() draws n rows) or of id lists (one sample); -> each prompt's ids [n, T + new],
    in the input order. max_new_tokens: an int, or a list of one a prompt. settings: Engine.submit's keywords for
    every prompt (eos_id, vocab_limit, stop, temperature, top_p, ...); each: a dict a prompt (or None) of the same
    keywords and "max_new_tokens" and "seed", winning over them. Seeds: prompt i's generator is seeded seed + i (its
    own "seed" or "generator" wins), so a prompt's text is the same whatever max_batch; no seed and none of its own:
    torch's global generator. on_done(i, ids): called as each prompt's result is taken, in order. prefix_caching:
    the Engine's (with kv_pages): prompts sharing full leading pages prefill them once. names: a prompt's name for
    a refusal at its submission or its error mid-answer (default "prompt i"); every prompt is submitted before the
    first on_done. stats: a dict given the Engine's stats at the end (prefix caching's prompt tokens and cached
    ones). max_prefill_tokens:
    the Engine's (chunked prefill: at most that many prompt tokens a step). prompt_lookup or draft, num_draft_tokens:
    the Engine's (n-gram or draft-model speculation: each prompt's text generate(prompt_lookup=...)'s or
    generate(draft=...)'s). max_loras: the Engine's (a
    model serving LoRA adapters, model/lora.py serve_adapters: each's "adapter" names the prompt's)."""
    import torch

    from tritongpt.train.engine import Engine

    each = each if each is not None else [None] * len(prompts)
    budgets = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    if not len(each) == len(budgets) == len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(budgets)} max_new_tokens and {len(each)} settings: pass "
                        "one of each a prompt")

    def named(e, i):  # e with prompt i's name first, its type and fields kept (a DrawError's field, say)
        e.args = (f"{names[i] if names is not None else f'prompt {i}'}: {e}",) + e.args[1:]
        return e

    engine = Engine(model, max_batch=max_batch, kv_cache_dtype=kv_cache_dtype, autocast=autocast, kv_pages=kv_pages,
                    page_size=page_size, cuda_graph=cuda_graph, prefix_caching=prefix_caching,
                    max_prefill_tokens=max_prefill_tokens, prompt_lookup=prompt_lookup,
                    num_draft_tokens=num_draft_tokens, max_loras=max_loras, draft=draft)
    try:
        handles = []
        for i, (ids, budget, own) in enumerate(zip(prompts, budgets, each)):
            kw = {**settings, "max_new_tokens": budget, **(own or {})}
            own_seed = kw.pop("seed", None)
            own_seed = own_seed if own_seed is not None else None if seed is None else seed + i
            if kw.get("generator") is None and own_seed is not None:
                kw["generator"] = torch.Generator(device=next(model.parameters()).device).manual_seed(own_seed)
            idx = ids if isinstance(ids, torch.Tensor) else torch.tensor([list(ids)], dtype=torch.long)
            try:
                handles.append(engine.submit(idx, kw.pop("max_new_tokens"), **kw))
            except UserError as e:  # (the engine's pages, say: which of thousands of prompts it could never admit)
                raise named(e, i) from None
        engine.start()  # steps on its thread while this one takes the results in order
        outs = []
        for i, h in enumerate(handles):
            try:
                outs.append(h.wait())
            except EngineDown:  # (the engine's fault, not the prompt's)
                raise
            except UserError as e:  # this prompt's own, mid-answer (its masks leave its text nothing, say): which
                raise named(e, i) from None
            if on_done is not None:
                on_done(i, outs[-1])
        return outs
    finally:
        engine.close()  # (an error or Ctrl-C: the requests still waiting end, the thread stops)
        if stats is not None:
            stats.update(engine.stats)


def read_prompts(path) -> list:
    """(where, record) pairs from --prompts: a .jsonl (or .json list) of records, or a .txt of one prompt a line
    (blank lines skipped, the line's own spaces kept); each record checked: its fields RECORD_FIELDS, the prompt
    a string, the settings in their ranges, an error naming the file and record otherwise."""
    from tritongpt.train.formats import text_field
    from tritongpt.train.generate import check_sampling
    from tritongpt.train.sft import read_json_records

    path = Path(path)
    if path.suffix == ".txt":
        lines = read_text_file(path).split("\n")
        raw = [(f"{path}: line {n}", {"prompt": line.removesuffix("\r")})
               for n, line in enumerate(lines, 1) if line.strip()]
        if not raw:
            raise UserError(f"{path}: no prompts (every line is blank)")
        return raw
    if path.suffix not in (".jsonl", ".json"):
        raise UserError(f"--prompts {path}: expected a .jsonl file of {{\"prompt\": TEXT}} records (or a .json list "
                        "of them) or a .txt file of one prompt a line")
    raw = read_json_records(path, "--prompts file")
    for where, rec in raw:
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object {{\"prompt\": TEXT, ...}}, got {type(rec).__name__}")
        text_field(rec, "prompt", where)  # (first: a file of other records is named for what it lacks)
        unknown = [k for k in rec if k not in RECORD_FIELDS]
        if unknown:
            raise UserError(f"{where}: unknown field '{unknown[0]}' (a record takes {', '.join(RECORD_FIELDS)})")
        value = rec.get("max_tokens")
        if value is not None and (not is_int(value) or value < 0):
            raise UserError(f"{where}: 'max_tokens' must be an integer >= 0, got {value!r}")
        value = rec.get("seed")
        if value is not None and (not is_int(value) or not -2**63 <= value < 2**63):
            raise UserError(f"{where}: 'seed' must be a 64-bit integer, got {value!r}")
        if "model" in rec and not isinstance(rec["model"], str):
            raise UserError(f"{where}: 'model' (a --lora-modules adapter's name) must be a string, got "
                            f"{rec['model']!r}")
        stop = rec.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or not all(isinstance(t, str) and t for t in stops):
            raise UserError(f"{where}: 'stop' must be a non-empty string or a list of them, got {stop!r}")
        try:
            check_sampling(**{k: rec[k] for k in ("temperature", "top_k", "top_p") if rec.get(k) is not None})
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        record_structure(rec, where)  # (checked now, compiled once the tokenizer is loaded)
    return raw


def record_structure(rec: dict, where: str, default=None):
    """A record's own structured outputs (train/structured.py StructuredOutputs) or None: its structured_outputs
    (vLLM's) or response_format (OpenAI's: {"type": "text"} is None, plain text), one of them; default where it
    gives neither (the --structured-outputs flag's)."""
    from tritongpt.train.structured import request_structure

    spec, field = request_structure(rec, f"{where}: ")
    return default if field is None else spec


def check_prompts_args(args):
    """generate --prompts: the flags it takes, checked before any model is built."""
    from tritongpt.train.serve import check_engine_args

    if args.out is None:
        raise UserError("--prompts writes its results to a .jsonl file: pass --out FILE")
    for flag, given in (("--stream", args.stream), ("--num-beams", args.num_beams != 1),
                        ("--prediction", args.prediction is not None)):
        if given:
            raise UserError(f"--prompts does not take {flag}: the batching engine draws one token a step for every "
                            "row, sampled or greedy (or with --prompt-lookup or --draft checks proposals)")
    if args.draft is not None and args.prompt_lookup is not None:
        raise UserError("--draft and --prompt-lookup are two drafts (a model, the text's own n-grams): pass one")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise UserError(f"--prompt-lookup (the longest n-gram looked up) must be a positive integer, "
                        f"got {args.prompt_lookup}")
    speculates = args.prompt_lookup is not None or args.draft is not None
    if args.draft_tokens is not None and (not speculates or args.draft_tokens < 1):
        raise UserError(f"--draft-tokens is how many tokens --prompt-lookup or --draft proposes at most a step: a "
                        f"positive integer with --prompt-lookup or --draft, got {args.draft_tokens}"
                        f"{'' if speculates else ' without either'}")
    if args.max_batch is None:
        args.max_batch = 32
    check_engine_args(args, one_row_engine=True)
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.num_samples > args.max_batch:
        raise UserError(f"--num-samples {args.num_samples} takes {args.num_samples} rows of the batch, more than "
                        f"--max-batch {args.max_batch}")


def cmd_generate_prompts(args):
    """`generate --prompts FILE --out FILE`: a record a sample of each prompt, in FILE's order; throughput said."""
    import torch
    from tqdm import tqdm

    from tritongpt.commands import (Choices, check_beam_args, check_cuda_graphs, check_generation_args,
                                    check_masks_end, encode_generate_prompt, load_draft, load_generation_model,
                                    mask_flags, model_end_ids, sampling_controls, stop_strings, token_masks)
    from tritongpt.train.common import autocast
    from tritongpt.train.engine import prefix_caching_said, speculation_said
    from tritongpt.train.serve import load_adapters, lora_modules, page_args
    from tritongpt.train.structured import Grammars, spec_from_flag
    from tritongpt.train.tokenizer import eot_or_none

    check_prompts_args(args)
    modules = lora_modules(args, None)  # (no runtime loading offline)
    check_beam_args(args)  # (--num-beams refused: its flags refused too, --temperature's default set)
    check_generation_args(args)
    stops = stop_strings(args.stop)
    spec = None if args.structured_outputs is None else spec_from_flag(args.structured_outputs)
    records = read_prompts(args.prompts)
    for where, rec in records:
        if rec.get("model") is not None and rec["model"] not in modules:
            served = f"--lora-modules names {', '.join(map(repr, modules))}" if modules else "no --lora-modules given"
            raise UserError(f"{where}: 'model' {rec['model']!r} is no adapter of this run ({served})")
    out_path = Path(args.out)
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder: name the .jsonl file to write")
    if not out_path.parent.is_dir():
        raise UserError(f"--out {out_path}: the folder {out_path.parent} does not exist")
    if out_path.is_file() and out_path.samefile(args.prompts):  # (it was read, then replaced by the results)
        raise UserError(f"--out {out_path} is the --prompts file: writing the results there would replace it; name "
                        "another file")
    flags = mask_flags(args)
    model, tok, device, dtype, limit = load_generation_model(args)
    if modules:
        load_adapters(model, modules, args.max_lora_rank, None)
    check_cuda_graphs(args, device, model)
    draft = load_draft(args, model, tok, device) if args.draft else None
    masks = token_masks(args, tok, limit or model.config.vocab_size, flags)
    eot, ctx = eot_or_none(tok), model.config.context_length
    ends = model_end_ids(args, tok, model, limit, eot)  # (the generation config's: `generate`'s, serve's)
    prompts, budgets, each, rows = [], [], [], []
    for where, rec in records:
        lead, ids = encode_generate_prompt(tok, rec["prompt"], args.allow_special, where=f"{where}: the prompt")
        budget = rec.get("max_tokens", args.max_new_tokens)
        if len(lead + ids) + budget > ctx:
            raise UserError(f"{where}: the prompt's {len(lead + ids)} tokens + max tokens {budget} > the model's "
                            f"context {ctx} (the engine does not slide the window): lower --max-new-tokens or the "
                            "record's max_tokens")
        own_stop = rec.get("stop")  # (a record's own list replaces --stop's; [] : none)
        choices = Choices(tok, ids, stops if own_stop is None else [own_stop] if isinstance(own_stop, str) else
                          own_stop, eot, lead=len(lead), stop_token_ids=ends)
        own = {k: rec[k] for k in ("temperature", "top_k", "top_p", "seed") if rec.get(k) is not None}
        own["adapter"] = rec.get("model")
        structure = record_structure(rec, where, spec)
        if structure is not None:  # (a guide a prompt: its samples' grammars)
            try:
                check_masks_end(masks, eot, structure, "--structured-outputs'" if structure is spec
                                else "its structured_outputs'")
                own["guide"] = Grammars.of(tok, limit or model.config.vocab_size).guide(structure)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        prompts.append(torch.tensor([lead + ids] * args.num_samples, dtype=torch.long))
        budgets.append(budget)
        each.append({**own, "stop": choices.stopped if choices.stops else None})
        rows.append(choices)
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", file=sys.stderr, leave=False)
    t0, generated = time.perf_counter(), 0
    stats = {}
    f = None  # opened at the first result: a prompt the engine refuses at submission leaves an earlier --out as is

    def write(i, out):  # the prompt's samples, as serve's completion choices (commands.Choices)
        nonlocal generated, f
        if f is None:
            f = open(out_path, "w", encoding="utf-8")
        choices = rows[i]
        for j, row in enumerate(out.tolist()):
            text, finish, tokens = choices.choice(j, row)
            generated += tokens
            model_name = {"model": records[i][1]["model"]} if records[i][1].get("model") is not None else {}
            f.write(json.dumps({"index": i, "sample": j, "prompt": records[i][1]["prompt"], **model_name,
                                "text": text, "finish_reason": finish, "prompt_tokens": choices.start,
                                "completion_tokens": tokens}, ensure_ascii=False) + "\n")
        bar.update()

    try:
        generate_batch(model, prompts, budgets, args.max_batch, kv_cache_dtype=args.kv_cache_dtype,
                       autocast=lambda: autocast(device, dtype), cuda_graph=args.cuda_graphs, seed=args.seed,
                       each=each, on_done=write, eos_id=eot, stop_token_ids=ends or None, vocab_limit=limit,
                       temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, names=[where for where, _ in records], stats=stats,
                       prompt_lookup=args.prompt_lookup, num_draft_tokens=args.draft_tokens, draft=draft,
                       max_loras=args.max_loras,
                       **sampling_controls(args), **masks, **page_args(args))
    except BaseException:  # (an engine error or Ctrl-C midway) the lines written stand: say they are not all
        if f is not None:
            note(f"--out {out_path} holds the results of the first {bar.n} of {len(prompts)} prompts only")
        raise
    finally:
        if f is not None:
            f.close()
    bar.close()
    seconds = time.perf_counter() - t0
    note(f"{len(prompts)} prompts ({len(prompts) * args.num_samples} samples) in {seconds:.2f} s: "
         f"{len(prompts) / seconds:.2f} prompts/s, {generated / seconds:.1f} generated tokens/s "
         f"(--max-batch {args.max_batch}); written to {out_path}")
    for said in (prefix_caching_said(stats), speculation_said(stats, "draft model" if draft else "prompt lookup")):
        if said:
            note(said)
    return 0
