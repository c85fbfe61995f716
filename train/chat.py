"""`tritongpt chat`: talk to a fine-tuned model, turn by turn, through the template it was tuned on.

Each message read is a user turn (a line; or several: read_message); the answer is printed as it is drawn and ends at the model's
<|endoftext|> (or at --max-new-tokens, or the context's end). With the chat template (train/formats.py) the whole
conversation is the prompt, encoded as SFT encodes a chat: each earlier answer ends in the eot
token, so the model reads its history as it was trained to. When the conversation outgrows the
context, its oldest turns are dropped (a system message stays) until --max-new-tokens (or half
the context, if less) fit after it. The alpaca and completion
templates have no turns: each message is answered on its own.

    tritongpt chat --weights runs/sft               # the template its run was tuned on
    tritongpt chat --weights runs/sft-chats --system "Answer in one word."   # a run tuned on chats
    printf 'Hi\\nAnd then?\\n' | tritongpt chat --weights runs/sft --temperature 0   # scripted

A line starting with / is a command: /reset forgets the conversation, /quit ends it (as does
the end of the input).
"""
import sys

from tritongpt.errors import UserError, note
from tritongpt.train import formats
from tritongpt.cli import command_help

TEMPLATES = ("auto",) + formats.FORMATS
QUOTE = '"""'  # opens and closes a message of several lines


EXPORTED_FORMAT = "tritongpt_prompt_format"  # the key `export` writes into config.json


def run_template(weights) -> str | None:
    """The prompt format a fine-tuning run saved with its checkpoint (SFT, reward, DPO, RLHF), or
    that `export` wrote into the config.json of its folder; None for a weights file alone or a
    run that saved none (pretraining)."""
    from tritongpt.train.common import load_state, resolve_checkpoint

    if weights is None:
        return None
    weights_file = resolve_checkpoint(weights)
    ckpt = weights_file.parent
    if (ckpt / "state.pt").is_file():
        return load_state(ckpt, mmap=True).get("prompt_format")
    if weights_file.suffix == ".safetensors":  # `merge` writes the format its models shared into the file
        from tritongpt.model.gpt import safetensors_metadata

        fmt = safetensors_metadata(weights_file).get("prompt_format")
        if fmt in formats.FORMATS:
            return fmt
    fmt = exported_config(ckpt).get(EXPORTED_FORMAT)
    return fmt if fmt in formats.FORMATS else None


def exported_config(folder) -> dict:
    """The config.json in folder (`tritongpt export` writes the prompt format into it, under EXPORTED_FORMAT), or
    {} where there is none, or it is not JSON or not an object."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def note_template_mismatch(data_formats, runs: dict) -> None:
    """A note for each run given to a trainer (flag -> weights) that was tuned on a prompt format
    the data does not use: a policy that will answer, or a reward model that will score, text in a
    template it has not seen (e.g. a reward model trained on chats scoring Alpaca prompts). A
    note, not an error: the run may be meant to learn the new template."""
    used = sorted({f for f in data_formats if f})
    for flag, weights in runs.items():
        if not weights or not used:
            continue
        try:
            tuned = run_template(weights)
        except UserError:  # a Hub name (no template), or a path its loader names in its own error
            continue
        if tuned is not None and tuned not in used:
            note(f"{flag} {weights} was tuned on {tuned} prompts, and these are {' and '.join(used)} prompts: "
                 f"it reads them in a template it was not trained on")


class Conversation:
    """The turns so far, and the prompt the next user line makes of them."""

    def __init__(self, template: str, system: str | None = None):
        if template not in formats.FORMATS:
            raise UserError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        if system is not None and template != "chat":
            raise UserError(f"--system needs the chat template (the {template} template has no system message)")
        if system is not None and not system.strip():
            raise UserError("--system is empty")
        self.template, self.system, self.turns = template, system, []

    def prompt(self, user: str, first: int = 0, tokenizer=None) -> tuple:
        """(text, eot after it) parts: the turns from `first` on, then `user`, ready for an answer
        (a chat in the tokenizer's own template if it has one: chat_template.py)."""
        if self.template == "completion":
            return ((user, False),)
        if self.template == "alpaca":
            return ((formats.format_prompt({"instruction": user}), False),)
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        for u, a in self.turns[first:]:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user})
        return tuple((t, e) for t, e, _ in formats.chat_parts(messages, tokenizer=tokenizer))

    def fit(self, tokenizer, user: str, context: int, max_new_tokens: int):
        """(prompt ids, answer budget, how many oldest turns were dropped to leave room for
        --max-new-tokens, or for half the context where that is less: a long answer budget
        should not cost a short conversation its history)."""
        first, room = 0, min(max_new_tokens, context // 2)
        ids = formats.encode_prompt(tokenizer, self.prompt(user, 0, tokenizer))
        while len(ids) + room > context and first < len(self.turns):
            first += 1
            ids = formats.encode_prompt(tokenizer, self.prompt(user, first, tokenizer))
        budget = min(max_new_tokens, context - len(ids))
        if budget < 1:
            raise UserError(f"this message is {len(ids)} tokens in the {self.template} template; "
                            f"the model's context is {context}: nothing is left for an answer")
        return ids, budget, first

    def add(self, user: str, answer: str, dropped: int = 0):
        if self.template == "chat":
            self.turns = self.turns[dropped:] + [(user, answer)]


def reply(model, tokenizer, ids, budget, *, temperature=0.0, top_k=None, top_p=None, dtype=None, generator=None,
          vocab_limit=None, stream: bool = True, stop_id=None, min_p=None, repetition_penalty=None,
          frequency_penalty=None, presence_penalty=None, no_repeat_ngram_size=None, draft=None, num_draft_tokens=4,
          stats=None, typical_p=None, epsilon_cutoff=None, eta_cutoff=None, top_n_sigma=None, cuda_graph=False,
          kv_cache_dtype="auto", guide=None, allowed_token_ids=None, bad_words=None, stop_token_ids=()):
    """Draw one answer after `ids` (printed as it comes, with stream): (its text up to the eot, or
    stop_id (a chat template's end-of-turn token), or one of stop_token_ids (the model's generation config's other
    end tokens), whether the model ended it). draft: a speculative decoding
    draft model (generate()'s; stats: its acceptance, filled). cuda_graph, kv_cache_dtype, guide (structured
    outputs: this answer's), allowed_token_ids, bad_words: generate()'s."""
    import torch

    from tritongpt.commands import TextStream, first_end
    from tritongpt.train.common import autocast
    from tritongpt.train.generate import generate

    eot = tokenizer.eot_id if stop_id is None else stop_id
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    printer = TextStream(tokenizer, [], eot, ends=stop_token_ids) if stream else None
    with autocast(device, dtype):
        out = generate(model, idx, budget, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_id=eot, generator=generator, vocab_limit=vocab_limit, on_token=printer, min_p=min_p,
                       repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                       presence_penalty=presence_penalty, no_repeat_ngram_size=no_repeat_ngram_size, draft=draft,
                       num_draft_tokens=num_draft_tokens, stats=stats, typical_p=typical_p,
                       epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_n_sigma=top_n_sigma,
                       cuda_graph=cuda_graph, kv_cache_dtype=kv_cache_dtype, guide=guide,
                       allowed_token_ids=allowed_token_ids, bad_words=bad_words,
                       stop_token_ids=list(stop_token_ids) or None)
    if printer:
        printer.close()
    new = out[0, len(ids):].tolist()
    end = first_end(new, {eot, *stop_token_ids})
    return tokenizer.decode(new if end is None else new[:end]), end is not None


def read_message(read_line):
    """One user message from read_line(prompt) (a line, None at the end of the input): a line,
    a line ending in a backslash going on to the next (llama.cpp's convention), or the lines from
    one opening with \"\"\" to one ending with it (ollama's). None at the end of the input; a
    message the input ends inside is what it holds so far."""
    line = read_line("> ")
    if line is None:
        return None
    if line.lstrip().startswith(QUOTE):
        parts, line = [], line.lstrip()[len(QUOTE):]
        while not line.rstrip().endswith(QUOTE):
            parts.append(line)
            line = read_line("... ")
            if line is None:
                note(f'the input ended inside a {QUOTE} message: it is sent as it stands')
                return "\n".join(parts).strip("\n")
        parts.append(line.rstrip()[:-len(QUOTE)])
        return "\n".join(parts).strip("\n")  # the quotes' own lines are not the message's
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = read_line("... ")
        if line is None:
            return "\n".join(parts)
    return "\n".join(parts + [line])


def cmd_chat(args):
    import torch

    from tritongpt.commands import (check_cuda_graphs, check_generation_args, check_masks_end, draft_note,
                                    load_draft, load_generation_model, mask_flags, model_end_ids, sampling_controls,
                                    token_masks)
    from tritongpt.train.structured import Grammars, spec_from_flag

    check_generation_args(args)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.draft_tokens is not None and not args.draft:
        raise UserError("--draft-tokens is how many tokens the --draft model proposes a step: pass --draft")
    if args.draft_tokens is not None and args.draft_tokens < 1:  # before any work, by its flag (as generate's)
        raise UserError(f"--draft-tokens must be a positive integer, got {args.draft_tokens}")
    if args.cuda_graphs and args.draft:
        raise UserError("--cuda-graphs replays a one-token decode step: it does not take --draft")
    spec = None if args.structured_outputs is None else spec_from_flag(args.structured_outputs)
    flags = mask_flags(args)
    model, tok, device, dtype, limit = load_generation_model(args)
    check_cuda_graphs(args, device, model)
    masks = token_masks(args, tok, limit or model.config.vocab_size, flags)  # (refused before the first message)
    grammars = None if spec is None else Grammars.of(tok, limit or model.config.vocab_size)
    if grammars is not None:
        grammars.compile(spec)  # (a spec that does not compile: refused now, before the first message)
    draft = load_draft(args, model, tok, device) if args.draft else None
    speculative = dict(draft=draft, num_draft_tokens=4 if args.draft_tokens is None else args.draft_tokens)
    totals = {"target_forwards": 0, "drafted": 0, "accepted": 0}  # the acceptance over the whole conversation
    template = args.template
    if template == "auto":
        template = run_template(args.weights)
        if template is None and getattr(tok, "chat_template", None) is not None:
            template = "chat"
            note(f"{args.weights or 'the model'} records no fine-tuning prompt format: using its tokenizer's own "
                 "chat template")
        elif template is None:
            template = "chat"
            note(f"{args.weights or 'the model'} records no fine-tuning prompt format (a pretrained model "
                 f"only continues text): using the chat template; pass --template to choose")
    conv = Conversation(template, args.system)
    stop = None
    if template == "chat" and getattr(tok, "chat_template", None) is not None:
        from tritongpt.train.chat_template import turn_end_id

        stop = turn_end_id(tok)
    check_masks_end(masks, tok.eot_id if stop is None else stop, spec)  # (reply's end of an answer)
    # the model's generation config's other end tokens end an answer too, as serve's chat answers (an instruct
    # Llama 3.1's <|eom_id|> and <|end_of_text|> beside its template's <|eot_id|>)
    ends = model_end_ids(args, tok, model, limit, tok.eot_id if stop is None else stop)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    tty = sys.stdin.isatty()
    if tty:
        print(f"chat ({template} template; /reset forgets the conversation, /quit ends; a line ending in \\ "
              'goes on, and """ opens and closes a message of several lines)', file=sys.stderr)

    def read_line(prompt):
        """A line without its end, None at the end of the input (Ctrl-D at a terminal)."""
        try:
            line = input(prompt) if tty else sys.stdin.readline()
        except EOFError:
            return None
        return line.rstrip("\r\n") if tty or line else None
    while True:
        user = read_message(read_line)
        if user is None:
            break  # the end of the input
        if not user.strip():
            continue
        if user.startswith("/") and "\n" not in user:
            command = user.strip()
            if command == "/quit":
                break
            if command == "/reset":
                conv.turns = []
                note("the conversation is forgotten")
                continue
            note(f"unknown command {command!r}: /reset forgets the conversation, /quit ends")
            continue
        try:
            ids, budget, dropped = conv.fit(tok, user, model.config.context_length, args.max_new_tokens)
        except UserError as e:
            note(str(e))
            continue
        if dropped:
            note(f"the conversation outgrew the context: its {dropped} oldest turn(s) are dropped")
        stats = {}
        answer, ended = reply(model, tok, ids, budget, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, dtype=dtype, generator=gen, vocab_limit=limit, stop_id=stop,
                              **sampling_controls(args), **speculative, stats=stats, cuda_graph=args.cuda_graphs,
                              kv_cache_dtype=args.kv_cache_dtype,
                              guide=None if grammars is None else grammars.guide(spec), stop_token_ids=ends,
                              **masks)
        for k in totals:
            totals[k] += stats.get(k, 0)
        if not ended:
            note(f"the answer was cut at {budget} tokens (--max-new-tokens, or the context's end)")
        conv.add(user, answer, dropped)
    draft_note(totals)
    return 0


def add_cli(sub):
    from tritongpt.commands import (add_cuda_graphs_arg, add_draft_args, add_generation_model_args,
                                    add_kv_cache_dtype_arg, add_mask_args, add_sampling_args)
    from tritongpt.train.structured import add_structured_arg

    p = sub.add_parser("chat", help=command_help("chat"))
    add_generation_model_args(p)
    add_cuda_graphs_arg(p)
    add_kv_cache_dtype_arg(p)
    p.add_argument("--template", default="auto", choices=TEMPLATES,
                   help="how a line becomes a prompt: chat (turns, train/formats.py), alpaca (an instruction), "
                        "completion (the line as it is); auto: the one the --weights run was tuned on, else chat "
                        "(default %(default)s)")
    p.add_argument("--system", help="a system message to open the conversation (chat template only)")
    add_sampling_args(p, max_new_tokens=256, temperature=0.7, temperature_text="a little less random than generate's")
    add_mask_args(p)
    add_draft_args(p)
    add_structured_arg(p, "every answer")
    p.set_defaults(func=cmd_chat)
