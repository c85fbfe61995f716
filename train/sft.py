"""Supervised fine-tuning (instruction tuning), as in Raschka's chapter 7 and TRL's SFTTrainer.

A record is Alpaca's {"instruction", "input" (optional), "output"}, a {"prompt", "completion"}
or a chat {"messages"} (train/formats.py has the three, and the chat template). An Alpaca
record becomes one token sequence

    ids = encode(format_prompt(record)) + encode(output) + [eot]

(prompt and response encoded separately, so a response generated after the prompt tokenizes
the same way; RLHF and DPO use the same layout). A chat is its turns encoded one by one, each
assistant turn ending in eot. A batch is padded with eot and shifted: inputs = seq[:-1],
targets = seq[1:]. Targets at padding are -100 (ignored by the loss) except the sequence's final eot,
which the model must learn to emit to stop; by default the prompt's targets (and a chat's user
turns) are -100 too, so only the responses are learned (--no-mask-prompt learns all of it).

Batches are grouped by length (sort within large random pools, cut into batches, shuffle the
batches with a generator seeded by (--seed, epoch), the same on every rank), so little compute
goes to padding. With --packing (TRL's packing=True, padding-free) a batch is instead rows of
exactly the context, each packed with whole examples (best-fit decreasing over shuffled pools,
the same on every rank), doc_ids keeping them apart: each attends to itself only and counts its
positions from 0, so a row computes what its examples would alone. Training is the
shared Trainer (checkpoints, exact resume, plots, DDP, --kernels). Evaluation: the held-out
loss, and greedy responses (KV cache, stop at eot) checked by exact match; the final responses
are saved as JSON.

    tritongpt sft --init runs/pretrain            # embedded verifiable tasks (train/tasks.py)
    tritongpt sft --init gpt2-small --data alpaca.json --tokenizer gpt2
    tritongpt sft --init runs/pretrain --data chats.jsonl     # {"messages": [...]} a line
"""
import bisect
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tritongpt.commands import (add_lora_args, add_qlora_args, add_vocab_multiple_arg, apply_lora, check_lora_args,
                                check_qlora, folder_base, folder_spec, qlora_record, quantize_base, vocab_multiple)
from tritongpt._types import is_real
from tritongpt.errors import UserError, note
from tritongpt.train.tokenizer import HF_WEIGHTS_HELP, HUB_REPO_HELP, TOKENIZER_CHOICES
from tritongpt.train import common, formats, tasks
from tritongpt.train.chat_template import add_chat_template_arg, answer_end_id, chat_template_for
# encode_text and format_prompt live with the formats; the trainers and tests import them from here too
from tritongpt.train.formats import encode_text, format_prompt
from tritongpt.cli import command_help

IGNORE_INDEX = -100
DEFAULT_TASKS, DEFAULT_N_TRAIN, DEFAULT_N_EVAL = "all", 5000, 200  # the embedded tasks' flags
DEFAULT_EVAL_GEN = 32
# the recorded flags' defaults that are not "off": what a run from before they were recorded went with
RUN_DEFAULTS = {"overlong": "drop", "tasks": DEFAULT_TASKS, "n_train": DEFAULT_N_TRAIN, "val_fraction": 0.1,
                "quantize": None, "group_size": None}


# -- records ----------------------------------------------------------------------------------------
def read_json_records(path, what: str = "data file") -> list:
    """(where, record) pairs from a .json list, a .jsonl file, a .parquet file (a row a record: the Hugging Face
    Hub's datasets) or a folder of .parquet shards (all of one split, read in name order as one list: a Hub
    dataset's data/ folder, or what a Hub dataset id as --data is fetched into); `where` names the file and index.

    Shared with the preference data (train/preference.py) so every trainer reports a bad
    record the same way: "<file>: record 3 (line 4): ...".
    """
    path = Path(path)
    if path.is_dir() or path.is_file() and path.suffix == ".parquet":
        from tritongpt.train.data import parquet_shards
        from tritongpt.train.parquet import parquet_records

        shards = parquet_shards(path) if path.is_dir() else [path]  # the one-split guard pretraining text has
        if not shards:
            raise UserError(f"{what} {path} is a folder with no .parquet files (records are read from a .json, "
                            ".jsonl or .parquet file, or a folder of .parquet shards)")
        raw = [(f"{shard}: record {i}", rec) for shard in shards for i, rec in enumerate(parquet_records(shard))]
        if not raw:
            raise UserError(f"{path}: no records")
        return raw
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    if path.suffix not in (".json", ".jsonl"):
        raise UserError(f"{path}: expected a .json (list of records), .jsonl (one record a line) or .parquet (a "
                        "row a record) file")
    try:
        # utf-8-sig: a byte-order mark (as Windows editors write) is dropped, as pretrain's
        # readers do; json.loads refuses one ("Unexpected UTF-8 BOM")
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        raw = jsonl_records(text, path)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            # a JSON Lines file named .json (as `datasets` writes one with to_json) parses to its first line
            lines = " (one JSON object a line? name the file .jsonl)" if e.msg == "Extra data" else ""
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}){lines}") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        raw = [(f"{path}: record {i}", rec) for i, rec in enumerate(data)]
    if not raw:
        raise UserError(f"{path}: no records")
    return raw


def jsonl_records(text: str, name) -> list:
    """(where, record) pairs of JSON Lines text, blank lines skipped; `where` names the file (name), the record's
    index and its line, as every reader of records reports a bad one; a line that is not JSON a UserError so named."""
    raw = []
    # records end at "\n" only (a "\r" before it is JSON whitespace): str.splitlines() also
    # breaks at U+2028, U+2029 and U+0085, which JSON strings may hold unescaped (json.dumps
    # with ensure_ascii=False writes them so), cutting such a record in two
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{name}: record {len(raw)} (line {line_no})"
        try:
            raw.append((where, json.loads(line)))
        except ValueError as e:  # (JSONDecodeError, or an integer past Python's 4300 digits: a plain ValueError)
            raise UserError(f"{where} is not valid JSON ({getattr(e, 'msg', e)})") from None
        except RecursionError:  # (nested past the parser's depth)
            raise UserError(f"{where} is not valid JSON (nested too deep)") from None
    return raw


def read_records(path) -> list:
    """SFT records from a .json file (a list of objects) or a .jsonl file (one object a line),
    all of one format (formats.read_record)."""
    return formats.read_records(read_json_records(path))


def split_by_prompt(items, val_fraction: float, prompt_of):
    """(train, val) by the hash of each item's prompt: deterministic, and a prompt never lands
    in both (several records or preference pairs may share one). A small file with more than
    one prompt still holds one prompt out, and training always keeps at least one prompt."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    keys = [prompt_of(x) for x in items]
    u = {k: tasks.unit_hash(k) for k in keys}
    held = {k for k, x in u.items() if x < val_fraction}
    if val_fraction > 0 and not held and len(u) > 1:
        held = {min(u, key=u.get)}
    if held and len(held) == len(u):  # every prompt hashed into the held-out share: train on one
        held.discard(max(u, key=u.get))
    return ([x for x, k in zip(items, keys) if k not in held],
            [x for x, k in zip(items, keys) if k in held])


def split_records(records, val_fraction: float):
    """SFT records split by prompt (an Alpaca one's instruction + input)."""
    return split_by_prompt(records, val_fraction, formats.record_key)


def task_splits(n_train: int, n_eval: int, seed: int = 0, families=None):
    """The embedded verifiable tasks: (train, val, test) records, disjoint by prompt."""
    return (tasks.generate_tasks(n_train, seed, "train", families),
            tasks.generate_tasks(n_eval, seed, "val", families),
            tasks.generate_tasks(n_eval, seed, "test", families))


# -- tokens ------------------------------------------------------------------------------------------
@dataclass
class Example:
    ids: list              # prompt + response + eot (a chat: every turn)
    prompt_len: int        # how many of ids are the prompt
    context: tuple = ()    # (start, end) ranges of ids after the prompt not learned: a chat's later user turns


def encode_records(records, tokenizer, max_len: int, overlong: str = "drop", what: str = "records",
                   template=format_prompt):
    """Tokenize records into Examples of at most max_len + 1 tokens (max_len inputs after the shift).

    Each part of a record (formats.record_parts) is encoded on its own; the prompt is the parts
    before the first learned one (a conversational prompt's earlier answers among them), and
    any later part not learned (a chat's next user turn) is context. overlong="drop" skips
    longer records; "truncate" cuts them at the end (the eot goes with it). Records with no
    response token left are dropped either way. Returns (examples, kept records), and prints how
    many were dropped or truncated. `template` is format_prompt except in tests that need
    sequences shorter than its ~20-token preamble.
    """
    if overlong not in ("drop", "truncate"):
        raise UserError(f"--overlong must be drop or truncate, got {overlong!r}")
    eot = tokenizer.eot_id
    examples, kept, n_dropped, n_cut = [], [], 0, 0
    for rec in records:
        ids, prompt_len, context = [], None, []
        for text, ends, learned in formats.record_parts(rec, template, tokenizer):
            start = len(ids)
            ids += encode_text(tokenizer, text) + ([eot] if ends else [])
            if learned and prompt_len is None:
                prompt_len = start
            elif not learned and prompt_len is not None and len(ids) > start:
                context.append((start, len(ids)))
        if len(full := formats.with_bos(tokenizer, ids)) > len(ids):  # BOS first, as the prompts get it
            ids, context = full, [(a + 1, b + 1) for a, b in context]
            prompt_len = prompt_len + 1 if prompt_len is not None else None
        if len(ids) > max_len + 1:
            if overlong == "drop" or prompt_len >= max_len + 1:
                n_dropped += 1
                continue
            ids, n_cut = ids[:max_len + 1], n_cut + 1
            context = [(a, min(b, max_len + 1)) for a, b in context if a < max_len + 1]
        examples.append(Example(ids, prompt_len, tuple(context)))
        kept.append(rec)
    if n_dropped or n_cut:
        print(f"sft: {what}: {n_dropped + n_cut} of {len(records)} records are longer than {max_len} "
              f"tokens: {n_dropped} dropped, {n_cut} truncated", file=sys.stderr)
    return examples, kept


def example_io(e: Example, mask_prompt: bool = True, ignore_index: int = IGNORE_INDEX):
    """One example's (inputs, targets), each len(e.ids) - 1 long: seq[:-1] and seq[1:], with the
    targets that are prompt or context tokens ignore_index under mask_prompt (a row of collate's
    before its padding, and a run of a packed row)."""
    seq = torch.tensor(e.ids, dtype=torch.long)
    inputs, targets = seq[:-1], seq[1:].clone()
    if mask_prompt:
        # target t is token t+1: tokens 1..prompt_len-1 belong to the prompt (none when the
        # prompt is empty: a slice to -1 would mask all but the last target)
        targets[:max(e.prompt_len - 1, 0)] = ignore_index
        for a, b in e.context:
            targets[a - 1:b - 1] = ignore_index
    return inputs, targets


def collate(examples, pad_id: int, mask_prompt: bool = True, ignore_index: int = IGNORE_INDEX,
            lengths: bool = False):
    """Pad and shift: inputs [B, T] = seq[:-1], targets [B, T] = seq[1:], T = longest seq - 1.

    Inputs are padded with pad_id (after the sequence: causal attention never looks there).
    Target positions past each sequence's end are ignore_index, so its final eot (the last
    real token) stays a target; with mask_prompt the targets that are prompt or context tokens
    are too.

    lengths: (inputs, targets, None, lengths [B]) instead, each row's real input tokens (the None where a
    packed batch has its doc_ids): the padding cannot be told from the targets (a chat cut in a later user
    turn ends in real tokens whose targets are ignored) nor from the inputs (pad_id is the eot), and a
    mixture of experts' load-balancing loss counts every real token (common.sft_real_mask).
    """
    T = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), ignore_index, dtype=torch.long)
    for i, e in enumerate(examples):
        x, y = example_io(e, mask_prompt, ignore_index)
        inputs[i, :len(x)], targets[i, :len(y)] = x, y
    if lengths:
        return inputs, targets, None, torch.tensor([len(e.ids) - 1 for e in examples], dtype=torch.long)
    return inputs, targets


def collate_packed(rows, row_len: int, pad_id: int, mask_prompt: bool = True, ignore_index: int = IGNORE_INDEX,
                   lengths: bool = False):
    """Packed rows: (inputs, targets, doc_ids), each [len(rows), row_len].

    rows: lists of Examples. A row holds its examples one after another, each as collate lays it
    out alone (example_io: its inputs, its targets, masked the same way), then padding (inputs
    pad_id, targets ignore_index) to row_len. doc_ids numbers the examples of a row 0, 1, ... and
    its padding len(row), so the model (GPTModel's doc_ids) restarts positions at each example and
    keeps its attention inside it. A target is always the example's own next token: none runs
    from one example into the next.

    lengths: (inputs, targets, doc_ids, lengths [len(rows)]) instead, each row's real tokens (its examples',
    before the padding), as collate(lengths=True).
    """
    inputs = torch.full((len(rows), row_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), row_len), ignore_index, dtype=torch.long)
    doc_ids = torch.empty((len(rows), row_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for j, e in enumerate(row):
            x, y = example_io(e, mask_prompt, ignore_index)
            if at + len(x) > row_len:
                raise ValueError(f"collate_packed: row {r} holds {at + len(x)}+ tokens, more than {row_len}")
            inputs[r, at:at + len(x)], targets[r, at:at + len(y)], doc_ids[r, at:at + len(x)] = x, y, j
            at += len(x)
        doc_ids[r, at:] = len(row)
    if lengths:
        return inputs, targets, doc_ids, torch.tensor([sum(len(e.ids) - 1 for e in row) for row in rows])
    return inputs, targets, doc_ids


def length_grouped_batches(lengths, batch_size: int, generator: torch.Generator, pool_batches: int = 50):
    """One epoch of batches (lists of indices), each of similar lengths, in a random order.

    Shuffle everything, sort each pool of pool_batches * batch_size by length, cut it into
    batches, then shuffle the batches: padding stays small and the order still varies.
    """
    n = len(lengths)
    perm = torch.randperm(n, generator=generator).tolist()
    pool = batch_size * pool_batches
    batches = []
    for s in range(0, n, pool):
        chunk = sorted(perm[s:s + pool], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def best_fit_decreasing(items, sizes, capacity: int):
    """Rows (lists of items) whose sizes sum to at most capacity: each item, largest first, goes
    into the row with the least room that still holds it, else into a new row (best-fit
    decreasing: never more than 11/9 of the fewest rows possible, plus one). Items of equal size
    keep the order of `items`; each row lists its items as they were placed."""
    rows, free = [], []  # free: (room left, row index), sorted, for the rows with room left
    for i in sorted(items, key=lambda i: -sizes[i]):
        k = bisect.bisect_left(free, (sizes[i], -1))  # the first row with room >= the item
        if k == len(free):
            rows.append([i])
            room, r = capacity - sizes[i], len(rows) - 1
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            room -= sizes[i]
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


def packed_batches(sizes, row_len: int, batch_size: int, generator: torch.Generator, pool_batches: int = 50):
    """One epoch of packed batches: lists of batch_size rows (the epoch's last may have fewer),
    each row a list of example indices whose sizes sum to at most row_len; every example is in
    exactly one row.

    Shuffle everything, cut it into pools of about pool_batches * batch_size rows' worth of
    tokens, pack each pool best-fit decreasing, then shuffle the rows and cut them into batches:
    the rows come out nearly full, and which examples share a row and the order both vary with
    the generator.
    """
    perm = torch.randperm(len(sizes), generator=generator).tolist()
    budget = pool_batches * batch_size * row_len
    rows, pool, filled = [], [], 0
    for i in perm:
        pool.append(i)
        filled += sizes[i]
        if filled >= budget:
            rows += best_fit_decreasing(pool, sizes, row_len)
            pool, filled = [], 0
    rows += best_fit_decreasing(pool, sizes, row_len)
    order = torch.randperm(len(rows), generator=generator).tolist()
    rows = [rows[i] for i in order]
    return [rows[j:j + batch_size] for j in range(0, len(rows), batch_size)]


class SFTData:
    """Training batches for the Trainer, epoch after epoch, and fixed held-out batches.

    An epoch's order comes from (seed, epoch) alone, so under torchrun every rank computes the
    same order and takes its own share of the batches (rank r: batches r, r + W, ...; the few
    left over after a multiple of W are skipped that epoch): one epoch covers the data once
    across all ranks, not once per rank (with fewer batches than ranks, every rank takes them
    all). The state (epoch, position, that epoch's seed, the number of ranks, the packing) goes
    into checkpoints, so a resumed run sees the same batches; one resumed on another number of
    ranks goes on after the batches the ranks took between them (repeating at most W - 1, skipping
    none), and one resumed with another packing as far into the epoch's tokens as the run had gone.

    pack_len (sft --packing): instead of length-grouped padded batches, batches of batch_size rows of
    exactly pack_len tokens, each holding whole examples (packed_batches) with doc_ids that keep
    them apart (collate_packed): (inputs, targets, doc_ids). No example may be longer than a row
    (pack_len input tokens): encode_records already cuts or drops them to the context. The
    held-out batches stay unpacked, so their loss compares with an unpacked run's.
    """

    def __init__(self, train, val, pad_id: int, batch_size: int, mask_prompt: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, pack_len: int | None = None):
        if not train:
            raise UserError("no training examples left (all were dropped: see the note above)")
        self.train, self.val = train, val
        self.pad_id, self.batch_size, self.mask_prompt = pad_id, batch_size, mask_prompt
        self.seed = seed
        env_rank, _, env_world = common.dist_env()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        self.lengths = [len(e.ids) for e in train]
        self.sizes = [n - 1 for n in self.lengths]  # input tokens: what an example takes of a row
        if pack_len is not None and max(self.sizes) > pack_len:
            raise UserError(f"--packing: an example of {max(self.sizes)} tokens does not fit in a packed row of "
                            f"{pack_len} (examples are cut or dropped to --max-length first)")
        self.pack_len = pack_len
        self.epoch, self.pos, self.epoch_seed, self._order = 0, 0, None, None

    def _collate(self, examples):
        return collate(examples, self.pad_id, self.mask_prompt)

    def get_batch(self, split: str, generator: torch.Generator = None):
        """The next training batch. generator (the Trainer's, one per rank) is not used: the
        ranks must agree on each epoch's order."""
        return self.collate_train(self.next_examples(split))

    def next_examples(self, split: str = "train") -> list:
        """The next training batch's Examples (packed: its rows, lists of them), not yet collated (GKD's
        generated answers replace theirs first: distill.OnPolicy)."""
        if split != "train":
            raise ValueError(f"SFTData.get_batch draws training batches only, not {split!r}")
        if self._order is None or self.pos >= len(self._order):
            if self._order is not None:
                self.epoch += 1
            self.epoch_seed = self._seed_of(self.epoch)
            self._order, self.pos = self._epoch_order(self.epoch_seed), 0
        batch = self._order[self.pos]
        self.pos += 1
        if self.pack_len is not None:
            return [[self.train[i] for i in row] for row in batch]
        return [self.train[i] for i in batch]

    def collate_train(self, examples):
        """next_examples' batch as tensors: (inputs, targets, None, lengths), packed (inputs, targets, doc_ids,
        lengths): each row's real tokens, which a mixture of experts' load-balancing loss counts."""
        if self.pack_len is not None:
            return collate_packed(examples, self.pack_len, self.pad_id, self.mask_prompt, lengths=True)
        return collate(examples, self.pad_id, self.mask_prompt, lengths=True)

    def _seed_of(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) % 2 ** 62

    def _epoch_batches(self, seed, pack_len):
        """The epoch's batches across all ranks: lists of example indices, or packed, lists of rows of them."""
        gen = torch.Generator().manual_seed(seed)
        if pack_len is not None:
            return packed_batches(self.sizes, pack_len, self.batch_size, gen)
        return length_grouped_batches(self.lengths, self.batch_size, gen)

    def _epoch_order(self, seed):
        batches = self._epoch_batches(seed, self.pack_len)
        if self.world_size > 1 and len(batches) >= self.world_size:
            batches = batches[:len(batches) - len(batches) % self.world_size][self.rank::self.world_size]
        return batches

    def layout(self, pack_len: int | None) -> tuple:
        """(rows, batches, padding): the first epoch across all ranks, packed into rows of pack_len
        tokens or (None) length-grouped: its rows, its batches, and the share of their input
        positions that are padding."""
        batches = self._epoch_batches(self._seed_of(0), pack_len)
        if pack_len is not None:
            rows = sum(len(b) for b in batches)
            positions = rows * pack_len
        else:
            rows = len(self.sizes)
            positions = sum(len(b) * max(self.sizes[i] for i in b) for b in batches)
        return rows, len(batches), 1 - sum(self.sizes) / positions if positions else 0.0

    def val_batches(self, max_batches: int | None = None):
        """Held-out batches, the same at every evaluation. When max_batches leaves examples
        out, the ones kept are a fixed random sample (the shortest would bias the loss low);
        they are batched by length so little is padding."""
        rows = list(range(len(self.val)))
        if max_batches is not None and max_batches * self.batch_size < len(rows):
            sample = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
            rows = sample[:max_batches * self.batch_size].tolist()
        rows.sort(key=lambda i: len(self.val[i].ids))
        for j in range(0, len(rows), self.batch_size):
            yield self._collate([self.val[i] for i in rows[j:j + self.batch_size]])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "epoch_seed": self.epoch_seed, "world_size": self.world_size,
                "pack_len": self.pack_len}

    def load_state_dict(self, d: dict):
        self.epoch, self.pos, self.epoch_seed = d["epoch"], d["pos"], d["epoch_seed"]
        self._order = None if self.epoch_seed is None else self._epoch_order(self.epoch_seed)
        saved_world = d.get("world_size", self.world_size)
        saved_pack = d.get("pack_len")  # checkpoints from before --packing: unpacked
        if saved_world != self.world_size or saved_pack != self.pack_len:
            # the saved ranks took the first pos * saved_world batches of the epoch's order between
            # them (rank r: r, r + W, ...); pos counted in this run's share of it goes on after those
            taken = self.pos * saved_world
            if saved_pack != self.pack_len and self.epoch_seed is not None:
                # the same epoch laid out another way (--packing or its row length changed): as far into it
                was = len(self._epoch_batches(self.epoch_seed, saved_pack))
                taken = taken * len(self._epoch_batches(self.epoch_seed, self.pack_len)) // max(was, 1)
            self.pos = taken // self.world_size


# -- loss and evaluation -----------------------------------------------------------------------------
def sft_loss(model, batch, label_smoothing: float = 0.0, z_loss: float = 0.0):
    """(summed cross-entropy over the batch's counted (response) targets, how many they are).

    A sum and a count, not a mean, so the Trainer weighs every response token of a step alike:
    batches of short and of long answers count different numbers of them (and a packed batch,
    (inputs, targets, doc_ids), the same sum as its examples one by one). label_smoothing and
    z_loss: the objective's options (GPTModel.forward's), 0 for the plain cross-entropy.

    A mixture-of-experts model's load-balancing loss (GPTConfig.moe_aux_loss times it, which forward adds to a
    mean loss only) joins the sum once per counted target, so that over the step's count it is the batch's aux
    as pretrain adds it. Under --grad-accum each micro-batch's aux then weighs its share of the step's counted
    targets (1/k where they count alike, as pretrain's windows do): 1/k exactly would need the step's count
    before the first micro-batch's backward, which the Trainer learns only at its end.
    """
    inputs, targets = batch[0], batch[1]
    doc_ids = batch[2] if len(batch) > 2 else None  # packed rows (--packing): each example kept apart
    loss = model(inputs, targets=targets, ignore_index=IGNORE_INDEX, reduction="sum", doc_ids=doc_ids,
                 label_smoothing=label_smoothing, z_loss=z_loss)
    n = (targets != IGNORE_INDEX).sum()
    # the padding left out of the routers' balance, every real token in it, counted target or not
    aux = common.moe_aux_term(model, common.sft_real_mask(batch, IGNORE_INDEX))
    return (loss if aux is None else loss + aux * n), n


@torch.no_grad()
def heldout_loss(model, data: SFTData, max_batches: int | None = None) -> float:
    """Token-weighted mean loss over the held-out batches (nan when there are none)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for inputs, targets in data.val_batches(max_batches):
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return total / count if count else float("nan")


@torch.no_grad()
def greedy_responses(model, tokenizer, records, max_new_tokens: int = 32, batch_size: int = 32,
                     template=format_prompt):
    """Greedy responses (KV cache, stop at eot) to each record's prompt: [(text, stopped)].

    Prompts of equal token length are batched together, so no padding is needed and every
    row is computed exactly as it would be alone.
    """
    from tritongpt.train.generate import generate

    device = next(model.parameters()).device

    # what ends an answer: the eot, or the model's chat template's own end of turn (<|im_end|>)
    ctx = model.config.context_length
    eot = answer_end_id(tokenizer, formats.record_prompt(records[0], template)) if records else tokenizer.eot_id
    # a tokenizer smaller than the model's vocabulary (pick_tokenizer allows one) cannot decode
    # the rest: only its ids are drawn, as `tritongpt generate` does
    limit = tokenizer.vocab_size if tokenizer.vocab_size < model.config.vocab_size else None
    prompts = [formats.encode_prompt(tokenizer, formats.prompt_parts(r, template, tokenizer)) for r in records]
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out = [("", False)] * len(records)
    for length, rows in sorted(by_len.items()):
        budget = min(max_new_tokens, ctx - length)
        if budget <= 0:
            continue  # the prompt fills the context: nothing can be generated
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            new = generate(model, idx, budget, temperature=0.0, eos_id=eot, vocab_limit=limit)[:, length:].tolist()
            for i, ids in zip(chunk, new):
                stopped = eot in ids
                out[i] = (tokenizer.decode(ids[:ids.index(eot)] if stopped else ids), stopped)
    return out


def evaluate_responses(model, tokenizer, records, max_new_tokens: int = 32, batch_size: int = 32,
                       template=format_prompt):
    """(rows, exact-match accuracy): rows hold the prompt (instruction and input; prompt; or the
    messages before the last answer), gold, prediction, correct and stopped."""
    rows = []
    preds = greedy_responses(model, tokenizer, records, max_new_tokens, batch_size, template)
    for rec, (pred, stopped) in zip(records, preds):
        if "messages" in rec:
            row = {"messages": rec["messages"][:-1]}
        elif "prompt" in rec:
            row = {"prompt": rec["prompt"]}
        else:
            row = {"instruction": rec["instruction"], "input": rec["input"]}
        row.update(gold=rec["output"], prediction=pred, correct=tasks.exact_match(pred, rec["output"]),
                   stopped=stopped)
        if "task" in rec:
            row["task"] = rec["task"]
        rows.append(row)
    acc = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
    return rows, acc


def per_task_accuracy(rows) -> dict:
    counts = {}
    for r in rows:
        c = counts.setdefault(r.get("task", "all"), [0, 0])
        c[0] += r["correct"]
        c[1] += 1
    return {k: c / n for k, (c, n) in sorted(counts.items())}


# -- model and tokenizer ------------------------------------------------------------------------------
def load_init_model(init: str, model_name: str | None = None, quantized_ok: bool = False):
    """--init: what load_checkpoint reads (a tritongpt checkpoint: file, ckpt folder or run folder; a Hugging Face
    folder or its weights file, of any family it reads; a .gguf file; a peft LoRA adapter folder, merged into its
    base), a GPT-2 or GPT-Neo name (pretrained weights), or another preset (random weights).
    model_name: the preset naming the heads of a GPT-2 file without its config.json. quantized_ok: an int8 or int4 file
    loads (the scorers run it; a trainer's --init refuses it by name)."""
    from tritongpt.model.config import PRESETS, get_config
    from tritongpt.model.gpt import GPTModel

    from tritongpt.train import gpt_neo_weights
    from tritongpt.train.gpt2_weights import HUB_REPOS, load_checkpoint, load_pretrained

    p = Path(init).expanduser()
    if p.exists():
        return load_checkpoint(p, model_name, quantized_ok=quantized_ok)

    if init in HUB_REPOS or init in gpt_neo_weights.HUB_REPOS:
        return load_pretrained(init)
    if init in PRESETS:
        note(f"--init {init}: random weights (no pretraining)")
        return GPTModel(get_config(init))
    raise UserError(f"--init {init!r}: no checkpoint there, and not a GPT-2 or GPT-Neo name "
                    f"({', '.join([*HUB_REPOS, *gpt_neo_weights.HUB_REPOS])}) or a preset ({', '.join(PRESETS)})")


def load_init_base(args):
    """--init as the trainers with LoRA load it (sft, dpo, kto, reward, rlhf): load_init_model's model, or a GPTQ or
    AWQ folder (or a .gguf file of Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K linears) kept quantized, its own matrices the
    frozen base LoRA trains beside (commands.folder_base, which refuses it without --lora-rank, or with --quantize, by
    name). The model's init_quantized is what the run records of that quantization ("gptq int4", "gguf int8"; None
    for any other --init), and its base_folder (the folder or .gguf file) is what a resume re-loads and
    check_same_base compares with the checkpoint's base bit for bit."""
    # decided from the model loaded, not the config: some folders the config calls quantized load as float (their
    # groups no int4 group size divides, a bitsandbytes 8-bit linear left float; a .gguf with a Q5_0 or Q5_K linear),
    # and those train like any float one
    spec = folder_spec(args)
    model = load_init_model(args.init, quantized_ok=spec is not None)
    own = folder_base(args, model, spec)  # (None: a float --init, or refused)
    model.init_quantized = own
    if own is not None:
        from tritongpt.commands import describe_quantized

        model.base_folder = str(args.init)
        note(f"QLoRA on --init's own {own.split()[0].upper()} quantization: the base's {model.quantized_linears} "
             f"matrices {describe_quantized(model)} frozen as --init holds them")
    return model


def load_quietly(spec):
    """The tokenizer, or None where it does not load (it only decides a note)."""
    from tritongpt.train.tokenizer import get_tokenizer

    try:
        return get_tokenizer(spec)
    except (UserError, ValueError, TypeError, KeyError, AttributeError, OSError):
        return None


def pick_tokenizer(spec, init, vocab_size: int):
    """--tokenizer if given, else the one saved with the --init run (or a GPT-Neo name's), else "gpt2" for a 50257
    vocab, else "default"; it must not have more tokens than the model."""
    from tritongpt.train.gpt_neo_weights import hub_tokenizer
    from tritongpt.train.tokenizer import get_tokenizer, saved_tokenizer_path

    # a GPT-Neo name: its own files, fetched with its weights (GPT-2's come from tiktoken, by vocab size)
    saved = saved_tokenizer_path(init) or hub_tokenizer(init)
    if spec is None and saved is not None:
        spec = saved
        try:
            tok = get_tokenizer(saved)
        except UserError as e:
            raise UserError(f"{e} (the tokenizer found with {init}; pass --tokenizer to use another)") from None
    else:
        spec = spec or ("gpt2" if vocab_size == 50257 else "default")
        tok = get_tokenizer(spec)
        if saved is not None and spec != saved and getattr(load_quietly(saved), "hash", None) != tok.hash:
            note(f"--tokenizer {spec} is not the tokenizer saved with the run of {init} ({saved}); "
                 "the model was trained on that one's token ids")
    if tok.vocab_size > vocab_size:
        raise UserError(f"tokenizer {spec} has {tok.vocab_size} tokens but the model only {vocab_size}; "
                        f"pass the tokenizer the model was trained with (--tokenizer)")
    return tok


# -- NEFTune ---------------------------------------------------------------------------------------------
def neftune_hook(alpha: float):
    """NEFTune (Jain et al. 2023), as transformers' Trainer adds it (its neftune_noise_alpha): in training, the token
    embeddings [B, L, d] get uniform noise in +-alpha / sqrt(L d); evaluation and generation (eval mode) none.
    A forward hook on the embedding module, so both kernel paths see the same noisy input."""
    def hook(module, args, output):
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return hook


def check_neftune(alpha):
    if not is_real(alpha) or not math.isfinite(alpha) or alpha < 0:
        raise UserError(f"--neftune-noise-alpha must be a finite number >= 0 (0: none; the paper uses 5), "
                        f"got {alpha!r}")


# -- the run --------------------------------------------------------------------------------------------
def run_sft(model, tokenizer, train_records, val_records, test_records, args, *, mask_prompt: bool = True,
            overlong: str = "drop", max_length: int | None = None, max_new_tokens: int = 32,
            eval_gen: int = 32, eval_before: bool = False, sample: bool = True,
            template=format_prompt, run_args: dict | None = None, loss_options: dict | None = None,
            packing: bool = False, neftune_alpha: float = 0.0, teacher=None, distill: dict | None = None,
            cuda_graph: bool = False) -> dict:
    """Fine-tune `model` with the shared Trainer; evaluate; save responses.json in args.out_dir.

    val_records give the held-out loss (and a quick exact match on the first eval_gen of them
    at each evaluation); test_records are answered greedily at the end (and before, with
    eval_before). Returns the Trainer's result plus exact_match (and exact_match_before).
    run_args: the data flags (--data, ...) for the Trainer to name when a resume changes them. cuda_graph:
    generate's, for GKD's generated answers (distill.OnPolicy).
    loss_options: {label_smoothing, z_loss} for the training loss (evaluations score plain CE).
    packing: train on rows of max_len tokens packed with whole examples (SFTData's pack_len).
    neftune_alpha: NEFTune's noise on the token embeddings while training (neftune_hook; 0: none).
    teacher: a frozen model to distill from (train/distill.py's load_teacher), with distill: its options
    (distill_options: recorded in the run's args, with or without a teacher).
    """
    from tritongpt.train import distill as kd
    from tritongpt.train.loop import Trainer

    ctx = model.config.context_length
    max_len = ctx if max_length is None else min(ctx, max_length)
    if max_len < 2:
        raise UserError(f"--max-length must be at least 2, got {max_len}")
    train, _ = encode_records(train_records, tokenizer, max_len, overlong, "train", template)
    val, val_kept = encode_records(val_records, tokenizer, max_len, overlong, "val", template)
    _, test_kept = encode_records(test_records, tokenizer, max_len, overlong, "test", template)
    data = SFTData(train, val, tokenizer.eot_id, args.batch_size, mask_prompt, seed=args.seed,
                   pack_len=max_len if packing else None)
    quick = val_kept[:eval_gen]

    def eval_fn(m):
        out = {"val_loss": heldout_loss(m, data, args.eval_batches)}
        if quick:
            out["val_exact_match"] = evaluate_responses(m, tokenizer, quick, max_new_tokens,
                                                        template=template)[1]
        return out

    def sample_fn(m):
        rec = val_kept[0]
        pred, _ = greedy_responses(m, tokenizer, [rec], max_new_tokens, template=template)[0]
        return f"{formats.describe(rec)} -> {pred!r} (gold {rec['output']!r})"

    loss_options = dict(loss_options or {})
    generating = teacher is not None and (distill["distill_lmbda"] > 0 or distill["distill_seq_kd"])
    loss_fn, data_state, parts = functools.partial(sft_loss, **loss_options), data, kd.Parts(generating)
    get_batch, on_policy = data.get_batch, None
    if generating:  # GKD: the batches' answers generated by the teacher (seq_kd) or the student (the lmbda draw)
        if packing:
            raise UserError("--distill-lmbda / --distill-seq-kd with --packing: generated answers have other "
                            "lengths than the packed rows were laid out for (train them unpacked)")
        end = answer_end_id(tokenizer, formats.record_prompt(train_records[0], template))
        on_policy = kd.OnPolicy(data, model, teacher, distill, end, tokenizer.vocab_size, max_len, args.seed,
                                data.rank, cuda_graph)
        get_batch = on_policy.get_batch
    if teacher is not None:  # the same (sum, count) over the response tokens, the teacher's divergence mixed in
        loss_fn = kd.sft_loss_fn(teacher, distill, tokenizer.vocab_size, IGNORE_INDEX, parts,
                                 on_policy.source if on_policy is not None else None, **loss_options)
        data_state = kd.WithTeacher(on_policy or data, teacher, distill["teacher"])
    trainer = Trainer(model, args, loss_fn, get_batch,
                      eval_fn=eval_fn if val else None,
                      sample_fn=sample_fn if sample and val_kept else None, name="sft", data_state=data_state,
                      run_args={**(run_args or {}), "no_mask_prompt": not mask_prompt, "overlong": overlong,
                                "max_length": max_length, "packing": packing, **loss_options,
                                "neftune_noise_alpha": neftune_alpha, **(distill or {})},
                      prompt_format=formats.format_of(train_records[0]),
                      step_metrics=parts.pop if teacher is not None else None,
                      run_defaults={**RUN_DEFAULTS, **kd.RUN_DEFAULTS})
    if teacher is not None:
        kd.place_teacher(teacher, trainer)
    if on_policy is not None:
        on_policy.place(trainer.device, trainer.dtype)
    out_dir = Path(args.out_dir)
    if trainer.is_main:
        from tritongpt.train.tokenizer import save_run_tokenizer

        save_run_tokenizer(tokenizer, out_dir)
    if trainer.is_main:
        # a --data file holds one held-out share: its records give both the loss and the answers
        held = (f"{len(val)} held out (the val loss and the test answers)" if test_records is val_records
                else f"{len(val)} val / {len(test_kept)} test")
        print(f"sft: {len(train)} train / {held} examples, context {max_len}, "
              f"prompt {'masked' if mask_prompt else 'learned too'}", file=sys.stderr)
        if packing:
            print(packing_line(data, max_len), file=sys.stderr)

    def run_eval(tag):
        m = trainer.raw_model
        with common.autocast(trainer.device, trainer.dtype):
            rows, acc = evaluate_responses(m, tokenizer, test_kept, max_new_tokens, template=template)
        print(f"sft: exact match {tag}: {acc:.3f} on {len(rows)} held-out records", file=sys.stderr)
        return rows, acc

    before = None
    if eval_before and test_kept and trainer.is_main and not args.resume:
        _, before = run_eval("before")
        trainer.clear_old_run()  # --overwrite: before this row, not at fit(), which would delete it
        trainer.metrics.log(step=0, test_exact_match=before)
    noise = model.tok_emb.register_forward_hook(neftune_hook(neftune_alpha)) if neftune_alpha else None
    try:
        result = trainer.fit(finish_tracking=False)  # the trackers get the test row below too
    finally:
        if noise is not None:  # the model goes back as it came (its answers below are noise-free: eval mode)
            noise.remove()
    result["exact_match_before"] = before
    with trainer.metrics.finishing():
        if trainer.is_main and test_kept:
            rows, acc = run_eval("after")
            by_task = per_task_accuracy(rows)
            if len(by_task) > 1:
                print("sft: by task: " + ", ".join(f"{k} {v:.2f}" for k, v in by_task.items()), file=sys.stderr)
            path = out_dir / "responses.json"
            path.write_text(json.dumps(rows, indent=1))
            trainer.metrics.log(step=trainer.step, test_exact_match=acc)
            result.update(exact_match=acc, exact_match_by_task=by_task, responses_path=str(path),
                          n_test=len(rows))
    return result


def packing_line(data: SFTData, max_len: int) -> str:
    """What --packing makes of the first epoch, against the length-grouped batches: one line."""
    def many(k, word, plural=None):
        return f"{k} {word if k == 1 else plural or word + 's'}"

    rows, batches, padding = data.layout(max_len)
    n, (_, plain_batches, plain) = len(data.sizes), data.layout(None)
    line = (f"sft: --packing: an epoch is {many(rows, 'row')} of {max_len} tokens ({many(n, 'example')}, "
            f"{many(batches, 'batch', 'batches')}), {100 * padding:.1f}% of the tokens padding (unpacked, "
            f"length-grouped: {many(n, 'row')} in {many(plain_batches, 'batch', 'batches')}, {100 * plain:.1f}% "
            "padding)")
    if rows == n > 1:
        line += (f"; no two examples fit in one row of {max_len} tokens: packing cannot apply, each example "
                 "gets a row of its own")
    if padding > plain:
        line += "; more padding than without --packing"
    return line


# -- command line -------------------------------------------------------------------------------------
def cmd_sft(args):
    from tritongpt.train.distill import distill_options, load_teacher
    from tritongpt.train.loop import TrainArgs, lm_loss_options

    targs = TrainArgs.from_namespace(args)
    targs.validate()
    loss_options = lm_loss_options(args)
    distill = distill_options(args, prompts=True)  # recorded without a teacher too: a resume names a change
    if args.cuda_graphs and not (distill["teacher"] and (distill["distill_lmbda"] > 0 or distill["distill_seq_kd"])):
        raise UserError("--cuda-graphs replays the decode steps of GKD's generated answers: it takes --teacher with "
                        "--distill-lmbda > 0 or --distill-seq-kd")
    check_neftune(args.neftune_noise_alpha)
    check_lora_args(args)  # before the model loads
    check_qlora(args)
    for name in ("max_new_tokens", "n_train"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("eval_gen", "n_eval"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.data and args.n_eval == 0:  # no held-out records: nothing for these to answer
        if args.eval_before:
            raise UserError("--eval-before answers the held-out test records before training; --n-eval 0 holds "
                            "none out")
        if args.eval_gen != DEFAULT_EVAL_GEN:
            raise UserError("--eval-gen sets how many held-out records are answered at each evaluation; --n-eval 0 "
                            "holds none out")
    if not args.data and args.val_fraction != RUN_DEFAULTS["val_fraction"]:  # the tasks' held-out: --n-eval's
        raise UserError("--val-fraction holds out a share of a --data file's records; the embedded tasks' held-out "
                        "records are --n-eval's: pass --data, or --n-eval")
    model = load_init_base(args)
    init_quantized = model.init_quantized
    common.set_moe_aux_loss(model, args)
    if vocab_multiple(args) is not None:
        model = model.pad_vocab(args.vocab_multiple)
    quantize_base(model, args)  # QLoRA: the frozen matrices quantized, then the updates beside them
    apply_lora(model, args)
    tok = pick_tokenizer(args.tokenizer, args.init, model.config.vocab_size)
    teacher = None
    if args.teacher is not None:  # it must see the whole of an example: run_sft's max_len
        ctx = model.config.context_length
        teacher = load_teacher(args.teacher, tok, ctx if args.max_length is None else min(ctx, args.max_length),
                               f"--init {args.init}", args.teacher_quantize, args.teacher_group_size)
    if args.data:
        given = [f for f, v, d in (("--tasks", args.tasks, DEFAULT_TASKS), ("--n-train", args.n_train, DEFAULT_N_TRAIN),
                                   ("--n-eval", args.n_eval, DEFAULT_N_EVAL)) if v != d]
        if given:
            raise UserError(f"{', '.join(given)} choose{'s' if len(given) == 1 else ''} the embedded tasks; with "
                            f"--data the records are the file's (--val-fraction holds some out)")
        records = read_records(args.data)
        train, val = split_records(records, args.val_fraction)
        test = val
        print(f"sft: {args.data}: {len(records)} records -> {len(train)} train, {len(val)} held out",
              file=sys.stderr)
    else:
        train, val, test = task_splits(args.n_train, args.n_eval, args.seed, args.tasks)
    tok = chat_template_for(tok, "sft", args.chat_template, any("messages" in r for r in train[:1]))
    result = run_sft(model, tok, train, val, test, targs, mask_prompt=not args.no_mask_prompt,
                     overlong=args.overlong, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                     eval_gen=args.eval_gen, eval_before=args.eval_before,
                     run_args={"data": common.data_path(args.data), "tasks": args.tasks, "n_train": args.n_train,
                               "val_fraction": args.val_fraction, "init": common.data_path(args.init),
                               **qlora_record(args), "init_quantized": init_quantized},
                     loss_options=loss_options, packing=args.packing, neftune_alpha=args.neftune_noise_alpha,
                     teacher=teacher, distill=distill, cuda_graph=args.cuda_graphs)
    if not result["is_main"]:  # DDP: rank 0 reports
        return 0
    if result.get("exact_match") is not None:
        before = result.get("exact_match_before")
        print(f"exact match: {'' if before is None else f'{before:.3f} before -> '}{result['exact_match']:.3f} "
              f"after SFT ({result['n_test']} held-out records; responses in {result['responses_path']})")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def add_cli(sub):
    from tritongpt.train.distill import add_distill_args
    from tritongpt.train.loop import add_lm_loss_args, add_train_args

    p = sub.add_parser("sft", help=command_help("sft"))
    p.add_argument("--init", required=True,
                   help="tritongpt checkpoint (run folder, ckpt folder or .safetensors), " + HF_WEIGHTS_HELP
                        + ", a GPT-2 or GPT-Neo name (gpt2-small, gpt-neo-125m ...: pretrained weights), "
                        + HUB_REPO_HELP
                        + " or tiny/mini (random weights)")
    p.add_argument("--data", help=".json list, .jsonl or .parquet of records, all {instruction, input, output}, all "
                                  "{prompt, completion} or all chats ({messages: [{role, content}, ...]}, or "
                                  "{prompt: [messages], completion: [one assistant message]}) "
                                  "(default: the embedded verifiable tasks)")
    p.add_argument("--tokenizer", help=TOKENIZER_CHOICES + " (default: the run's saved tokenizer, "
                                       "else gpt2 for a 50257 vocab, else default)")
    add_vocab_multiple_arg(p, None, "as the --init model has them")
    add_lora_args(p)
    add_qlora_args(p)
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"embedded task families, comma list or 'all' "
                                                          f"({', '.join(tasks.FAMILIES)})")
    p.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN,
                   help="embedded training records (default %(default)s)")
    p.add_argument("--n-eval", type=int, default=DEFAULT_N_EVAL,
                   help="embedded held-out records, each of val and test; the whole test split is "
                        "answered once at the end (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=RUN_DEFAULTS["val_fraction"],
                   help="share of a --data file held out, by prompt hash (default %(default)s)")
    add_chat_template_arg(p)
    p.add_argument("--no-mask-prompt", action="store_true",
                   help="learn the prompt tokens (and a chat's user turns) too")
    p.add_argument("--overlong", choices=["drop", "truncate"], default="drop",
                   help="records longer than the context (default %(default)s)")
    p.add_argument("--max-length", type=int, default=None, help="cap on tokens per example (default: the context)")
    p.add_argument("--neftune-noise-alpha", type=float, default=0.0, metavar="ALPHA",
                   help="NEFTune: uniform noise of +-ALPHA/sqrt(length x width) on the token embeddings while "
                        "training (its paper and transformers' Trainer: 5; 0 = none) (default %(default)s)")
    p.add_argument("--packing", action="store_true",
                   help="train on --batch-size rows of exactly the context (or --max-length) tokens, each packed "
                        "with whole examples that attend only to themselves, positions restarting at each one (TRL's "
                        "packing=True, padding-free), instead of length-grouped padded batches: the same loss per "
                        "response token; held-out batches stay unpacked; prints the epoch's padding both ways")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="response budget when evaluating (default %(default)s)")
    p.add_argument("--eval-gen", type=int, default=DEFAULT_EVAL_GEN,
                   help="held-out records answered at each evaluation (default %(default)s)")
    p.add_argument("--eval-before", action="store_true", help="also answer the held-out set before training")
    add_lm_loss_args(p)
    common.add_moe_aux_arg(p)
    add_distill_args(p)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --distill-lmbda or --distill-seq-kd: each generated answer's decode steps replays of a "
                        "CUDA graph captured at the first (generate --cuda-graphs; CUDA only)")
    add_train_args(p, out_dir="runs/sft", max_steps=500, batch_size=16, lr=1e-4, min_lr=1e-5, warmup_steps=20,
                   eval_every=100, ckpt_every=500, sample_every=100, log_every=50)
    p.set_defaults(func=cmd_sft)
