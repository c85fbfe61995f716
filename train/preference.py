"""Preference data: (prompt, chosen, rejected) triples for the reward model, DPO and RLHF prompts.

A preference file is JSON (a list of records) or JSONL (one record a line). A record is

    {"prompt": "...", "chosen": "...", "rejected": "..."}
or  {"instruction": "...", "input": "...", "chosen": "...", "rejected": "..."}
or  {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [{...}]}
or  {"chosen": [messages], "rejected": [messages]}       (the prompt: every message but the last)

The second form is formatted with SFT's prompt template (train/formats.py: format_prompt), and
the chats (TRL's conversational forms, explicit and implicit prompt) with its chat template, so
a reward model or a DPO run sees prompts exactly as the SFT model was trained on them.

Without a file we build pairs from the verifiable task set (train/tasks.py): chosen is the
correct answer, rejected a plausible wrong one (tasks.wrong_answer). Such pairs need no human
labels and their "truth" can be checked by exact match.

Token layout of one response (shared by every trainer here):
    ids = encode(prompt) + encode(response) + [eot]
The prompt and the response are encoded separately, as SFT does, so a response generated
after a prompt during RLHF tokenizes the same way. The reward is read at the last token (eot).
"""
import math
import random
from dataclasses import dataclass, field

import torch

from tritongpt.errors import UserError, note
from tritongpt.train import formats, tasks
from tritongpt.train.chat_template import answer_end_id
from tritongpt.train.formats import encode_prompt, encode_text, format_prompt
from tritongpt.train.sft import read_json_records, split_by_prompt


@dataclass
class PreferencePair:
    prompt: str | tuple  # already formatted (template applied); a chat's (text, eot after it) parts
    chosen: str
    rejected: str
    format: str = field(default="completion", compare=False)  # of the prompt: formats.FORMATS
    margin: float | None = None  # a record's own: how much better chosen is (Llama 2's; the reward loss's)


def _chat_pair(rec, where: str) -> PreferencePair:
    """A conversational record: the prompt's messages, and one assistant answer each side. A string prompt beside
    whole chats (HuggingFaceH4/ultrafeedback_binarized's shape) is those chats' last user message: checked, and the
    chats' own messages are the prompt."""
    whole = all(isinstance(rec[k], list) and len(rec[k]) > 1 for k in ("chosen", "rejected"))
    if isinstance(rec.get("prompt"), str) and whole:
        pair = _chat_pair({k: v for k, v in rec.items() if k != "prompt"}, where)
        last_user = [m["content"] for m in pair.prompt.messages if m["role"] == "user"][-1]
        if last_user.strip() != rec["prompt"].strip():
            raise UserError(f"{where}: field 'prompt' is not the chats' last user message (the chats are read whole: "
                            "a string prompt beside them must be that message)")
        return pair
    if "prompt" in rec:
        prompt = formats.check_messages(rec["prompt"], where, "prompt", ends_with="user")
        answers = [formats.one_answer(rec, key, where) for key in ("chosen", "rejected")]
    else:
        chosen, rejected = (formats.check_messages(rec[k], where, k) for k in ("chosen", "rejected"))
        if chosen[:-1] != rejected[:-1]:
            raise UserError(f"{where}: 'chosen' and 'rejected' must share every message but the last "
                            f"(those are the prompt)")
        # check_messages saw a user message first: the prompt is never empty
        prompt, answers = chosen[:-1], [chosen[-1]["content"], rejected[-1]["content"]]
    if answers[0] == answers[1]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical")
    return PreferencePair(formats.ChatPrompt(prompt), *answers, format="chat")


# -- reading records -----------------------------------------------------------------------------
def _record_to_pair(rec, where: str, template) -> PreferencePair:
    pair = _prompt_and_answers(rec, where, template)
    # TRL's RewardTrainer's margin column: -log sigmoid(r_c - r_r - margin); a null is none, as in a Parquet file
    if rec.get("margin") is not None:
        m = rec["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise UserError(f"{where}: field 'margin' must be a finite number (how much better 'chosen' is), "
                            f"got {m!r}")
        pair.margin = float(m)
    return pair


def _prompt_and_answers(rec, where: str, template) -> PreferencePair:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise UserError(f"{where}: missing field '{key}'")
    if isinstance(rec["chosen"], list) or isinstance(rec["rejected"], list) or isinstance(rec.get("prompt"), list):
        return _chat_pair(rec, where)
    for key in ("chosen", "rejected"):
        if not isinstance(rec[key], str) or not rec[key].strip():
            raise UserError(f"{where}: field '{key}' must be a non-empty string")
    if rec["chosen"] == rec["rejected"]:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise UserError(f"{where}: field 'prompt' must be a non-empty string")
        prompt, fmt = rec["prompt"], "completion"
    elif "instruction" in rec:
        if not isinstance(rec["instruction"], str) or not rec["instruction"].strip():
            raise UserError(f"{where}: field 'instruction' must be a non-empty string")
        if not isinstance(rec.get("input", ""), str):
            raise UserError(f"{where}: field 'input' must be a string")
        prompt, fmt = (template or format_prompt)(rec), "alpaca"
    else:
        raise UserError(f"{where}: needs a 'prompt' or an 'instruction' field")
    return PreferencePair(prompt, rec["chosen"], rec["rejected"], format=fmt)


def read_preference_file(path, template=None) -> list[PreferencePair]:
    """Pairs from a .json (list of records), .jsonl or .parquet file; errors name the file and record.
    Chats and text prompts do not mix in one file (the two string forms may, as they always could)."""
    return preference_pairs(read_json_records(path, what="preference file"), template)


def preference_pairs(raw, template=None) -> list[PreferencePair]:
    """Pairs from (where, record) pairs as read_json_records gives them (KTO reads a file once, then looks at its
    records to tell pairs from unpaired examples)."""
    pairs, first = [], None
    for where, rec in raw:
        pairs.append(_record_to_pair(rec, where, template))
        if first is None:
            first = where
        elif (pairs[-1].format == "chat") != (pairs[0].format == "chat"):
            raise UserError(f"{where} is {formats.with_article(pairs[-1].format)} record but {first} is "
                            f"{pairs[0].format}: "
                            f"a file holds chats or text prompts, not both")
        elif (pairs[-1].margin is None) != (pairs[0].margin is None):
            which, other = (where, first) if pairs[0].margin is not None else (first, where)
            raise UserError(f"{which} has no 'margin' but {other} has one: give every pair a margin, or none")
    return pairs


def task_preferences(n: int = 2000, seed: int = 0, template=None, split: str = "train",
                     families=None) -> list[PreferencePair]:
    """The embedded default: task prompts, correct answer chosen, a plausible wrong one rejected.

    The task set assigns every prompt to train, val or test by its hash, so pairs of
    different splits never share a prompt (nor do they with SFT's training split).
    """
    template = template or format_prompt
    rng = random.Random(f"preference:{seed}:{split}")
    pairs = []
    for rec in tasks.generate_tasks(n, seed=seed, split=split, families=families):
        wrong = tasks.wrong_answer(rec, rng)
        if tasks.exact_match(wrong, rec["output"]):
            continue  # the generator could not find a wrong answer for this record
        pairs.append(PreferencePair(template(rec), rec["output"], wrong, format="alpaca"))
    return pairs


def is_embedded(source) -> bool:
    return source in (None, "", "tasks", "default")


def note_batch_repeats(size: int, n: int, flag: str, what: str, source) -> None:
    """A batch is drawn at random, with replacement, from the n training items (reward's, dpo's and kto's pairs or
    examples, rlhf's prompts): one larger than a --data file holds draws some of them twice in every batch, which
    went unsaid (pretrain refuses a batch larger than its data). The embedded tasks' count is --num-pairs, chosen
    beside the batch."""
    if size > n and not is_embedded(source):
        note(f"{flag} {size} is more than the {n} training {what} of --data {source} (less the held-out share): "
             f"every batch draws some of them twice")


def train_val_pairs(source=None, n: int = 2000, val_fraction: float = 0.1, seed: int = 0, template=None):
    """(train, held-out) pairs. Embedded: n pairs from the task's train split and
    round(n * val_fraction) from its val split (disjoint prompts); a file: split by prompt hash."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if is_embedded(source):
        if n < 1:
            raise UserError(f"--num-pairs must be at least 1, got {n}")
        n_val = round(n * val_fraction)
        return (task_preferences(n, seed, template, "train"),
                task_preferences(n_val, seed, template, "val") if n_val else [])
    return split_pairs(read_preference_file(source, template), val_fraction)


def split_pairs(pairs: list, val_fraction: float):
    """Held-out pairs by the hash of their prompt, as SFT splits records: a prompt with
    several pairs never has some in training and others held out."""
    return split_by_prompt(pairs, val_fraction, lambda p: formats.prompt_key(p.prompt))


# -- tokens ---------------------------------------------------------------------------------------
@dataclass
class EncodedPair:
    prompt: list      # prompt token ids
    chosen: list      # response ids, eot included
    rejected: list
    margin: float = 0.0  # the pair's margin (PreferencePair.margin; 0: none)


def encode_answers(tokenizer, prompt, answers, ends: dict):
    """(prompt ids, [answer ids + the end token] for each answer): the layout above. ends caches the end token of a
    chat and of a text prompt (the eot, or a chat template's end of turn: rendered once, not per prompt)."""
    chat = isinstance(prompt, formats.ChatPrompt)
    if chat not in ends:
        ends[chat] = answer_end_id(tokenizer, prompt)
    return encode_prompt(tokenizer, prompt), [encode_text(tokenizer, a) + [ends[chat]] for a in answers]


def encode_fitting(items, tokenizer, max_len: int, what: str, answers, build) -> list:
    """Tokenize each item's prompt and answers(item) (texts) in the layout above, build(item, prompt ids, answers'
    ids) its record; items whose prompt + longest answer exceed max_len are dropped (and counted)."""
    out, dropped, ends = [], 0, {}
    for item in items:
        prompt, encoded = encode_answers(tokenizer, item.prompt, answers(item), ends)
        if not prompt or len(prompt) + max(map(len, encoded)) > max_len:
            dropped += 1
            continue
        out.append(build(item, prompt, encoded))
    if not out:
        raise UserError(f"none of the {len(items)} {what} fit in {max_len} tokens")
    if dropped:
        note(f"dropped {dropped} of {len(items)} {what} longer than {max_len} tokens")
    return out


def encode_pairs(pairs, tokenizer, max_len: int, what: str = "preference pairs") -> list[EncodedPair]:
    """Tokenize; pairs whose prompt + longer response exceed max_len are dropped (and counted)."""
    return encode_fitting(pairs, tokenizer, max_len, what, lambda p: (p.chosen, p.rejected),
                          lambda p, prompt, answers: EncodedPair(prompt, *answers, p.margin or 0.0))


def pad_sequences(seqs, pad_id: int, device="cpu"):
    """Right-pad token lists into idx [B, T]; also return their lengths [B].

    Right padding is harmless under causal attention with absolute positions: a token never
    sees what comes after it, and every sequence starts at position 0.
    """
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return idx.to(device), lengths.to(device)


def response_mask(prompt_lens, lengths, T: int):
    """Mask [B, T-1] over next-token targets: True where target t+1 is a response token.

    Target position t+1 is predicted from logits at t, so the response tokens at
    [prompt_len, length) are the targets at [prompt_len - 1, length - 1).
    """
    t = torch.arange(T - 1, device=lengths.device)
    return (t >= (prompt_lens - 1).unsqueeze(1)) & (t < (lengths - 1).unsqueeze(1))


def pair_batch(encoded: list, pad_id: int, device="cpu"):
    """Chosen rows then rejected rows in one batch [2B, T], so one forward scores both.

    Returns idx [2B, T], lengths [2B], mask [2B, T-1] (response targets).
    """
    prompts = [e.prompt for e in encoded] * 2
    return response_batch(prompts, [e.chosen for e in encoded] + [e.rejected for e in encoded], pad_id, device)


def response_batch(prompts: list, responses: list, pad_id: int, device="cpu"):
    """Row i is prompts[i] + responses[i], right-padded: idx [B, T], lengths [B], mask [B, T-1] (response targets)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    idx, lengths = pad_sequences(seqs, pad_id, device)
    return idx, lengths, response_mask(prompt_lens, lengths, idx.size(1))


def next_token_logprobs(logits, temperature: float = 1.0):
    """log p(. | idx[:, :t+1]) for t < T-1 over the whole vocabulary, in fp32: [B, T-1, V].
    With a temperature, of softmax(logits / temperature): the distribution sampling draws from."""
    logits = logits[:, :-1].float()
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def pick_next_tokens(logp_all, idx):
    """From next_token_logprobs, the entries of the tokens that did come next: [B, T-1]."""
    return logp_all.gather(-1, idx[:, 1:].unsqueeze(-1)).squeeze(-1)


def token_logprobs(logits, idx, temperature: float = 1.0):
    """log p(idx[:, t+1] | idx[:, :t+1]) for t < T-1, in fp32: [B, T-1]."""
    return pick_next_tokens(next_token_logprobs(logits, temperature), idx)


def model_token_logprobs(model, idx):
    """token_logprobs(model(idx), idx), computed by the model's own loss path: [B, T-1] fp32.

    On the Triton path that is the fused cross-entropy, which never builds the fp32
    [B, T, vocab] log-softmax that token_logprobs needs (the last position has no next token:
    its target is ignored).
    """
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1)
    return -model(idx, targets=targets, ignore_index=-100, reduction="none")[:, :-1]


def sequence_logprobs(model, idx, mask):
    """Sum of the response tokens' log-probs under model: [B]."""
    return (model_token_logprobs(model, idx) * mask).sum(-1)
