"""SFT: the prompt template, collate masking, record checking, length grouping, the verifiable
task generator, a real before/after exact-match measurement, and Triton-path parity."""
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import plot_stub
from parity import assert_close_rel, assert_paths_grads_float64s, record_step_grads
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel, lm_loss
from tritongpt.model.toggle import KERNEL_NAMES
from tritongpt.train import sft, tasks
from tritongpt.train.loop import TrainArgs, Trainer
from tritongpt.train.sft import Example, collate, format_prompt
from tritongpt.train.tokenizer import saved_tokenizer_path


pytestmark = pytest.mark.usefixtures("one_thread")
no_plots, real_plots = plot_stub.no_plots, plot_stub.real_plots  # (empty PNGs unless a test reads one)


class CharTokenizer:
    """One id per character (its code point, < 128 here), <|endoftext|> = 128."""
    eot_id = 128
    vocab_size = 129

    def encode(self, text, allowed_special="none_raise"):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i < 128)


def small_bpe(records, vocab_size=400):
    """A real byte-level BPE trained on formatted task records: the template becomes ~19 tokens."""
    from tritongpt.train.tokenizer import BPETokenizer

    corpus = "<|endoftext|>".join(format_prompt(r) + r["output"] for r in records)
    return BPETokenizer.train(corpus, vocab_size)


def train_args(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), max_steps=3, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=0,
                eval_every=0, ckpt_every=0, log_every=0, sample_every=0, weight_decay=0.0, device="cpu",
                kernels="reference", seed=0, dtype="fp32")
    base.update(kw)
    return TrainArgs(**base)


# -- template --------------------------------------------------------------------------------------
def test_prompt_template_with_and_without_input():
    rec = {"instruction": "Add the two numbers.", "input": "2 3", "output": "5"}
    assert format_prompt(rec) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nAdd the two numbers.\n\n### Input:\n2 3\n\n### Response:\n")
    for no_input in ({"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say hi.", "input": "", "output": "hi"}):
        assert format_prompt(no_input) == (
            "Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


# -- collate -----------------------------------------------------------------------------------------
def test_collate_pads_shifts_and_masks_exactly():
    # prompt tokens 11 12 13 | response 21 22 | eot 99;   prompt 11 12 | response 21 | eot 99
    batch = [Example([11, 12, 13, 21, 22, 99], prompt_len=3), Example([11, 12, 21, 99], prompt_len=2)]
    inputs, targets = collate(batch, pad_id=99, mask_prompt=False)
    assert inputs.tolist() == [[11, 12, 13, 21, 22],
                               [11, 12, 21, 99, 99]]
    assert targets.tolist() == [[12, 13, 21, 22, 99],
                                [12, 21, 99, -100, -100]]  # the first eot stays a target
    inputs_m, targets_m = collate(batch, pad_id=99, mask_prompt=True)
    assert torch.equal(inputs_m, inputs)
    assert targets_m.tolist() == [[-100, -100, 21, 22, 99],
                                  [-100, 21, 99, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long

    # the loss counts exactly the unmasked targets: 5 of them here
    logits = torch.randn(2, 5, 100, generator=torch.Generator().manual_seed(0))
    keep = targets_m != -100
    manual = -torch.log_softmax(logits, -1)[keep].gather(-1, targets_m[keep][:, None]).mean()
    assert torch.allclose(lm_loss(logits, targets_m), manual)


def test_collate_with_an_empty_prompt_masks_nothing():
    """prompt_len 0 (a template that gives no text): every target is a response token. The
    prompt's slice [:prompt_len - 1] was [:-1] then, and masked all but the last target."""
    inputs, targets = collate([Example([21, 22, 23, 99], prompt_len=0)], pad_id=99, mask_prompt=True)
    assert targets.tolist() == [[22, 23, 99]]
    assert collate([Example([21, 22, 23, 99], prompt_len=1)], pad_id=99)[1].tolist() == [[22, 23, 99]]


def test_encode_records_layout_and_overlong(capsys):
    tok = CharTokenizer()
    recs = [{"instruction": "Echo.", "input": "ab", "output": "ab"},
            {"instruction": "Echo.", "input": "", "output": "x" * 400}]
    prompt0 = format_prompt(recs[0])
    examples, kept = sft.encode_records(recs, tok, max_len=len(prompt0) + 10, overlong="drop")
    assert kept == recs[:1]
    assert examples[0].ids == [ord(c) for c in prompt0 + "ab"] + [128]
    assert examples[0].prompt_len == len(prompt0)
    err = capsys.readouterr().err
    assert "1 of 2 records are longer than" in err and "1 dropped, 0 truncated" in err

    max_len = len(prompt0) + 10
    examples, kept = sft.encode_records(recs, tok, max_len=max_len, overlong="truncate")
    err = capsys.readouterr().err
    assert "1 of 2 records are longer than" in err and "0 dropped, 1 truncated" in err
    assert len(examples) == 2 and len(examples[1].ids) == max_len + 1
    assert examples[1].ids[-1] == ord("x")  # truncated at the end: the eot went with it
    inputs, targets = collate(examples, tok.eot_id)
    assert inputs.shape == (2, max_len)
    assert (targets[1] != -100).sum() == max_len + 1 - examples[1].prompt_len


# -- records ----------------------------------------------------------------------------------------
def test_read_records_and_malformed_errors(tmp_path):
    good = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Say hi.", "output": "hi"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(good))
    want = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Say hi.", "input": "", "output": "hi"}]
    assert sft.read_records(tmp_path / "d.jsonl") == want
    assert sft.read_records(tmp_path / "d.json") == want

    bad = tmp_path / "bad.json"
    cases = [({"input": "x", "output": "y"}, r"bad.json: record 1: missing field 'instruction'"),
             ({"instruction": "x"}, r"bad.json: record 1: missing field 'output'"),
             ({"instruction": "x", "output": 3}, r"record 1: field 'output' must be a string, got int"),
             ({"instruction": "x", "output": "  "}, r"record 1: field 'output' is empty"),
             ({"instruction": "x", "input": ["a"], "output": "y"}, r"record 1: field 'input' must be a string"),
             ("just text", r"record 1: expected a JSON object"),
             # kto's undesirable example: it was learned as a target
             ({"prompt": "x", "completion": "y", "label": False}, r"record 1: label false marks an undesirable "
                                                                  r"completion \(kto's")]
    for rec, msg in cases:
        bad.write_text(json.dumps([good[0], rec]))
        with pytest.raises(UserError, match=msg):
            sft.read_records(bad)
    badl = tmp_path / "bad.jsonl"
    badl.write_text(json.dumps(good[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(UserError, match=r"bad.jsonl: record 1 \(line 3\) is not valid JSON"):
        sft.read_records(badl)
    badl.write_text(json.dumps(good[0]) + "\n" + json.dumps({"instruction": "x", "output": ""}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl: record 1 \(line 2\): field 'output' is empty"):
        sft.read_records(badl)
    bad.write_text('[{"instruction": "x",')
    with pytest.raises(UserError, match=r"bad.json: not valid JSON"):
        sft.read_records(bad)
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}))
    with pytest.raises(UserError, match=r"bad.json: expected a JSON list of records, got dict"):
        sft.read_records(bad)
    bad.write_text("[]")
    with pytest.raises(UserError, match="no records"):
        sft.read_records(bad)
    with pytest.raises(UserError, match="data file not found"):
        sft.read_records(tmp_path / "missing.json")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match=r"expected a .json .*, .jsonl .* or .parquet .* file"):
        sft.read_records(tmp_path / "d.txt")


def test_read_jsonl_keeps_unicode_line_separators_inside_records(tmp_path):
    # U+2028, U+2029 and U+0085 may stand unescaped in a JSON string: they do not end a JSONL record
    recs = [{"instruction": "Copy.", "input": "one\u2028two\u2029three", "output": "a\x85b"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in recs), encoding="utf-8")
    assert sft.read_records(path) == recs
    path.write_text(json.dumps(recs[0], ensure_ascii=False) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"record 1 \(line 2\) is not valid JSON"):
        sft.read_records(path)


def test_read_records_with_a_byte_order_mark(tmp_path):
    recs = [{"instruction": "Say hi.", "input": "", "output": "hi"}]
    (tmp_path / "d.json").write_text(json.dumps(recs), encoding="utf-8-sig")
    (tmp_path / "d.jsonl").write_text(json.dumps(recs[0]) + "\n", encoding="utf-8-sig")
    assert sft.read_records(tmp_path / "d.json") == recs
    assert sft.read_records(tmp_path / "d.jsonl") == recs


def test_sft_resume_names_changed_data_flags(tmp_path, capsys):
    """--data, --no-mask-prompt, --overlong, --max-length change what SFT trains on: a resume that
    changes them says so, as it does for TrainArgs' flags."""
    from tritongpt.cli import main

    recs = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("hi", "yes", "no", "ok", "up", "go")]
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(recs))
    common_flags = ["sft", "--init", "tiny", "--tokenizer", "default", "--out-dir", str(tmp_path / "run"),
                    "--batch-size", "2", "--eval-every", "0", "--eval-gen", "0", "--sample-every", "0",
                    "--device", "cpu", "--kernels", "reference"]
    assert main(common_flags + ["--data", str(tmp_path / "a.json"), "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(common_flags + ["--data", str(tmp_path / "b.json"), "--max-steps", "1", "--resume",
                                "--no-mask-prompt", "--overlong", "truncate", "--max-length", "64"]) == 0
    err = capsys.readouterr().err
    assert (f"note: resuming with --data {tmp_path / 'b.json'} (the run had {tmp_path / 'a.json'}), "
            "--no-mask-prompt True (False), --overlong truncate (drop), --max-length 64 (None)") in err, err


def test_sft_with_data_refuses_the_embedded_tasks_flags_and_says_val_is_test(tmp_path, capsys):
    """--tasks, --n-train and --n-eval choose the embedded tasks: with --data they were silently
    ignored. A file's one held-out share is both the val loss and the test answers: said so."""
    from tritongpt.cli import main

    recs = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "up", "go", "on", "in")]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    flags = ["sft", "--init", "tiny", "--tokenizer", "default", "--data", str(tmp_path / "a.jsonl"), "--batch-size",
             "2", "--eval-every", "0", "--eval-gen", "0", "--sample-every", "0", "--device", "cpu", "--kernels",
             "reference", "--max-steps", "1", "--val-fraction", "0.3"]
    for extra, said in ((["--tasks", "sum"], "--tasks chooses the embedded tasks; with --data"),
                        (["--n-train", "50", "--n-eval", "9"], "--n-train, --n-eval choose the embedded tasks")):
        assert main([*flags, "--out-dir", str(tmp_path / "bad"), *extra]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    assert main([*flags, "--out-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "held out (the val loss and the test answers) examples" in err and " test examples" not in err


def test_split_records_is_deterministic_and_disjoint():
    recs = tasks.generate_tasks(300, seed=5, split=None)
    train, val = sft.split_records(recs, 0.2)
    assert (train, val) == sft.split_records(list(recs), 0.2)
    assert 30 <= len(val) <= 90 and len(train) + len(val) == len(recs)
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in val}
    assert len(sft.split_records(recs[:2], 0.01)[1]) == 1  # a tiny file still holds one out
    with pytest.raises(UserError, match="val-fraction"):
        sft.split_records(recs, 1.0)


# -- length grouping and batches ----------------------------------------------------------------------
def test_length_grouped_batches_cover_everything_with_little_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1000)]
    batches = sft.length_grouped_batches(lengths, 16, torch.Generator().manual_seed(1), pool_batches=20)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert sum(len(b) == 16 for b in batches) >= len(batches) - 4  # only pool tails are short

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    random_batches = [perm[j:j + 16] for j in range(0, 1000, 16)]
    assert padding(batches) < 0.1 * padding(random_batches)
    # the batch order is shuffled, not sorted: lengths of consecutive batches are not monotone
    firsts = [lengths[b[0]] for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    # the generator decides everything
    again = sft.length_grouped_batches(lengths, 16, torch.Generator().manual_seed(1), pool_batches=20)
    other = sft.length_grouped_batches(lengths, 16, torch.Generator().manual_seed(2), pool_batches=20)
    assert again == batches and other != batches


def test_sft_data_epochs_and_exact_resume():
    rng = random.Random(0)
    examples = [Example(list(range(rng.randint(3, 30))), 2) for _ in range(50)]
    data = sft.SFTData(examples, [], pad_id=0, batch_size=8)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(7):  # 50 examples / 8 = 7 batches: one epoch
        x, y = data.get_batch("train", gen)[:2]
        seen.append(x.shape[0])
        assert x.shape == y.shape
    assert sum(seen) == 50 and data.epoch == 0
    first_order = data._order
    data.get_batch("train", gen)
    assert data.epoch == 1 and data._order != first_order  # each epoch in an order of its own
    for _ in range(3):
        data.get_batch("train", gen)
    state, gen_state = data.state_dict(), gen.get_state()
    rest = [data.get_batch("train", gen) for _ in range(10)]  # crosses into epoch 2

    resumed = sft.SFTData(examples, [], pad_id=0, batch_size=8)
    resumed.load_state_dict(state)
    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    for (x, y, _, n), (x2, y2, _, n2) in zip(rest, (resumed.get_batch("train", gen2) for _ in range(10))):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(n, n2)
    with pytest.raises(UserError, match="no training examples"):
        sft.SFTData([], [], 0, 8)


def test_sft_data_ranks_share_each_epoch_between_them():
    """Under torchrun each rank takes its own batches of one common epoch order: no example is
    seen twice in an epoch, and every rank takes the same number of steps per epoch."""
    rng = random.Random(2)
    # 10 batches of 8 (the last of 6): one more than 3 ranks share evenly, left over that epoch
    examples = [Example(list(range(rng.randint(3, 30))), 2) for _ in range(78)]
    ranks = [sft.SFTData(examples, [], pad_id=-1, batch_size=8, seed=5, rank=r, world_size=3) for r in range(3)]

    def epoch_rows(data):
        data.get_batch("train")
        rows = [data._order[i] for i in range(len(data._order))]
        return [i for batch in rows for i in batch]

    for epoch in range(2):
        seen = [epoch_rows(d) for d in ranks]
        assert len({len(d._order) for d in ranks}) == 1  # lockstep: the same steps per epoch
        flat = [i for rows in seen for i in rows]
        assert len(flat) == len(set(flat)) >= 78 - 2 * 8  # disjoint; at most W-1 batches skipped
        for d in ranks:
            d.pos = len(d._order)  # finish the epoch
    single = sft.SFTData(examples, [], pad_id=-1, batch_size=8, seed=5, rank=0, world_size=1)
    single.get_batch("train")
    assert len(single._order) == 10 and sorted(i for b in single._order for i in b) == list(range(78))


def test_sft_data_resumed_on_another_number_of_ranks_goes_on_where_they_stopped():
    """A checkpoint of 2 ranks resumed in 1 process (and the reverse): the epoch goes on after the
    batches taken between them. The position was taken as it was, counted in the new share, so
    2 -> 1 read again what rank 1 had taken (8 of 16 examples) and 1 -> 2 skipped batches."""
    examples = [Example(list(range(3 + i % 7)) + [1000 + i], 1) for i in range(40)]  # 10 batches of 4

    def data(rank, world):
        return sft.SFTData(examples, [], pad_id=-1, batch_size=4, seed=5, rank=rank, world_size=world)

    def take(d, n):  # the examples of n batches (each one's last target is its marker)
        return [int(t) - 1000 for _ in range(n) for t in d.get_batch("train")[1].flatten() if t >= 1000]

    two = [data(r, 2) for r in (0, 1)]
    before = take(two[0], 2) + take(two[1], 2)
    one = data(0, 1)
    one.load_state_dict(two[0].state_dict())  # the Trainer hands a new rank the state of rank 0
    after = take(one, len(one._order) - one.pos)
    assert sorted(before + after) == list(range(40))  # the epoch once: nothing read twice, nothing skipped

    one = data(0, 1)
    before = take(one, 3)
    two = [data(r, 2) for r in (0, 1)]
    for d in two:
        d.load_state_dict(one.state_dict())
    after = take(two[0], len(two[0]._order) - two[0].pos) + take(two[1], len(two[1]._order) - two[1].pos)
    assert set(before + after) == set(range(40))  # none skipped
    assert len(before + after) - 40 <= 4  # at most one batch (W - 1) again


def test_held_out_batches_are_fixed_and_not_just_the_shortest():
    rng = random.Random(1)
    val = [Example(list(range(n)), 1) for n in rng.sample(range(3, 60), 40)]
    data = sft.SFTData(val[:1], val, pad_id=0, batch_size=4)
    lengths = lambda batches: sorted(int((x != 0).sum(1).max()) for x, _ in batches)  # noqa: E731
    everything = list(data.val_batches())
    assert sum(x.shape[0] for x, _ in everything) == 40
    some = list(data.val_batches(3))
    assert sum(x.shape[0] for x, _ in some) == 12
    assert all(torch.equal(a[0], b[0]) for a, b in zip(some, data.val_batches(3)))  # the same each time
    # a sample across the lengths, not the 12 shortest of 40 (which all have < 20 tokens here)
    assert max(lengths(some)) > sorted(len(e.ids) for e in val)[11]


# -- the task generator --------------------------------------------------------------------------------
def test_tasks_are_deterministic_disjoint_and_verifiable():
    a = tasks.generate_tasks(300, seed=1)
    assert a == tasks.generate_tasks(300, seed=1)
    assert a != tasks.generate_tasks(300, seed=2)
    assert {r["task"] for r in a} == set(tasks.FAMILIES)
    splits = {s: tasks.generate_tasks(400, seed=s_i, split=s) for s_i, s in enumerate(tasks.SPLITS)}
    prompts = {s: {(r["instruction"], r["input"]) for r in recs} for s, recs in splits.items()}
    for s, recs in splits.items():
        assert len(prompts[s]) == len(recs)                      # distinct within a split
        assert all(tasks.split_of(r) == s for r in recs)
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    # the answers are right (spot checks per family)
    for r in a:
        inp, out = r["input"], r["output"]
        if r["task"] == "add":
            assert int(out) == sum(map(int, inp.split()))
        elif r["task"] == "sort_words":
            assert out.split() == sorted(inp.split())
        elif r["task"] == "reverse_words":
            assert out.split() == inp.split()[::-1]
        elif r["task"] == "count_words":
            assert int(out) == len(inp.split())
        elif r["task"] == "commas_to_spaces":
            assert out == inp.replace(",", " ")
        assert len(out) <= 30
    easy = tasks.generate_tasks(50, seed=0, split="test", families="first_word,last_word")
    assert {r["task"] for r in easy} == {"first_word", "last_word"}
    with pytest.raises(UserError, match="unknown task family"):
        tasks.generate_tasks(5, families="first_word,nope")
    with pytest.raises(UserError, match="could only make"):
        tasks.generate_tasks(2000, split="test", families="add")


def test_exact_match_and_wrong_answers():
    assert tasks.exact_match(" 42\n", "42") and not tasks.exact_match("42.", "42")
    assert not tasks.exact_match(None, "42")
    recs = tasks.generate_tasks(600, seed=3)
    rng = random.Random(0)
    wrong = [tasks.wrong_answer(r, rng) for r in recs]
    assert not any(tasks.exact_match(w, r["output"]) for w, r in zip(wrong, recs))
    rng = random.Random(0)
    assert wrong == [tasks.wrong_answer(r, rng) for r in recs]  # deterministic under the rng
    by_task = {r["task"]: (r, w) for r, w in zip(recs, wrong)}
    r, w = by_task["add"]
    assert abs(int(w) - int(r["output"])) == 1  # off by one
    r, w = by_task["sort_digits"]
    assert sorted(w.split()) == sorted(r["output"].split())  # same digits, wrong order
    # records without a task (e.g. from a file) still get a wrong answer
    for gold in ("17", "alpha beta", "word"):
        w = tasks.wrong_answer({"instruction": "x", "input": "", "output": gold}, random.Random(1))
        assert w.strip() and not tasks.exact_match(w, gold)


# -- end to end ------------------------------------------------------------------------------------------
def compact_template(rec):
    """A short prompt so the interpreter-run Triton test stays within a 32-token context."""
    return f"{rec['instruction']}\n{rec['input']}\n="


def test_end_to_end_sft_raises_exact_match(tmp_path):
    """A tiny model pretrained briefly on the embedded corpus, saved, reloaded through --init's
    loader, then fine-tuned on one easy task family (count the words); measured by greedy
    exact match on held-out prompts before and after SFT."""
    from tritongpt.train import data

    fams = "count_words"
    train, val, test = sft.task_splits(2000, 100, seed=0, families=fams)
    tok = small_bpe(tasks.generate_tasks(600, seed=1, families=fams), vocab_size=440)
    assert all(len(tok.encode(" " + w)) == 1 for w in tasks.WORDS)  # one token a word

    # brief pretraining: next-token prediction on a slice of the pydoc corpus
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_embd=64, n_layer=1, n_head=1))
    text = torch.tensor(tok.encode(data.load_text("pydoc")[:20000]), dtype=torch.long)
    starts = lambda g: torch.randint(len(text) - 65, (8,), generator=g)  # noqa: E731
    pre = Trainer(model, train_args(tmp_path / "pre", max_steps=40, lr=3e-3, ckpt_every=0),
                  lambda m, b: m(b[0], targets=b[1]),
                  lambda split, g: (lambda s: (torch.stack([text[i:i + 64] for i in s]),
                                               torch.stack([text[i + 1:i + 65] for i in s])))(starts(g)))
    pre_result = pre.fit()
    assert pre_result["loss"] < pre_result["first_loss"] - 0.5, pre_result
    model = sft.load_init_model(pre_result["checkpoint"])  # what `tritongpt sft --init CKPT` does

    args = train_args(tmp_path, max_steps=250, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                      eval_batches=2)
    result = sft.run_sft(model, tok, train, val, test, args, eval_before=True, eval_gen=16, max_new_tokens=8,
                         sample=False)
    before, after = result["exact_match_before"], result["exact_match"]
    print(f"exact match on {result['n_test']} held-out count_words prompts: {before:.2f} before SFT, "
          f"{after:.2f} after (val loss {result['val_loss']:.3f})")
    assert result["n_test"] == 100
    # always answering the same count would score about 1/6
    assert after >= 0.5 and after >= before + 0.4
    rows = json.loads((tmp_path / "responses.json").read_text())
    assert len(rows) == 100 and sum(r["correct"] for r in rows) == round(after * 100)
    assert all(r["correct"] == (r["prediction"].strip() == r["gold"]) for r in rows)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_exact_match"] for m in logged if "test_exact_match" in m] == [before, after]


def test_triton_path_runs_the_same_sft_steps(tmp_path, monkeypatch):
    """Three SFT steps through the Trainer on each path, from the same weights and batches; the first step's
    gradients (of sft_loss's sum, the fused head's reduction="sum") held to a float64 model's."""
    train = tasks.generate_tasks(12, seed=0, families="first_word")
    corpus = tasks.generate_tasks(300, seed=1, families="first_word")
    from tritongpt.train.tokenizer import BPETokenizer

    tok = BPETokenizer.train("<|endoftext|>".join(compact_template(r) + r["output"] for r in corpus), 300)
    examples, _ = sft.encode_records(train, tok, max_len=32, template=compact_template)
    assert len(examples) == 12 and max(len(e.ids) for e in examples) - 1 <= 32
    torch.manual_seed(0)
    base = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=32, n_layer=2, n_head=1))
    state = {k: v.clone() for k, v in base.state_dict().items()}
    losses, weights, first, batches = {}, {}, {}, []
    steps = record_step_grads(monkeypatch)
    for path in ("reference", "triton"):
        model = GPTModel(base.config)
        model.load_state_dict(state)
        data = sft.SFTData(examples, [], tok.eot_id, batch_size=2)

        def get_batch(split, gen=None, _get=data.get_batch):
            batches.append(_get(split, gen))
            return batches[-1]
        trainer = Trainer(model, train_args(tmp_path / path, kernels=path, lr=3e-3), sft.sft_loss, get_batch,
                          name="sft")
        losses[path] = torch.tensor(trainer.fit()["losses"], dtype=torch.float64)
        weights[path] = model.state_dict()
        names = {p: n for n, p in model.named_parameters()}
        first[path] = {names[p]: g for p, g in steps[-3]}
        assert model.kernels == (frozenset(KERNEL_NAMES) if path == "triton" else frozenset())
    # A gradient off by a common factor moves AdamW's steps by nothing fp32 shows (the fused head's sum 1% off
    # passed the checks below), so the first step's, from the same weights and batch, against float64: 1e-4
    # (measured <= 4e-7 on both paths)
    assert len(steps) == 6 and batches[0][2] is batches[3][2] is None  # unpacked: no doc_ids
    assert all(torch.equal(batches[0][i], batches[3][i]) for i in (0, 1, 3))
    want = GPTModel(base.config).set_kernels("reference").double()
    want.load_state_dict(state)
    loss_sum, count = sft.sft_loss(want, batches[0])
    (loss_sum / count).backward()
    assert_paths_grads_float64s({path: first[path] for path in ("reference", "triton")}, want, 1e-4)
    assert len(losses["reference"]) == 3 and torch.isfinite(losses["reference"]).all()
    assert_close_rel(losses["triton"], losses["reference"], 1e-4, "sft losses (triton vs reference)")
    for name, ref in weights["reference"].items():
        if name.endswith("W_key.bias"):
            continue  # its gradient is exactly 0 (softmax ignores a per-query shift): both hold rounding noise
        assert not torch.equal(ref, state[name])  # the steps moved it
        assert_close_rel(weights["triton"][name], ref, 1e-4, f"after 3 steps: {name}")
    # a different code path really ran: kernels round differently from the reference somewhere
    assert any(not torch.equal(weights["triton"][k], v) for k, v in weights["reference"].items())


def test_cli_runs_on_a_data_file(tmp_path, capsys):
    from tritongpt.cli import main

    recs = tasks.generate_tasks(40, seed=0, families="first_word,last_word")
    tok = small_bpe(tasks.generate_tasks(300, seed=1, families="first_word,last_word"))
    tok.save(tmp_path / "run" / "tokenizer.json")
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_embd=32, n_layer=1, n_head=1))
    model.save(tmp_path / "run" / "model.safetensors")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    out = tmp_path / "sft"
    rc = main(["sft", "--init", str(tmp_path / "run"), "--data", str(tmp_path / "d.jsonl"), "--out-dir", str(out),
               "--max-steps", "2", "--batch-size", "4", "--eval-every", "1", "--eval-gen", "2",
               "--max-new-tokens", "4", "--device", "cpu", "--kernels", "reference", "--sample-every", "0",
               "--val-fraction", "0.2", "--vocab-multiple", "64"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "exact match:" in stdout and "after SFT" in stdout
    rows = json.loads((out / "responses.json").read_text())
    assert rows and set(rows[0]) >= {"instruction", "input", "gold", "prediction", "correct"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m and "val_exact_match" in m for m in metrics)
    assert any("test_exact_match" in m for m in metrics)
    assert (out / "tokenizer.json").is_file() and (out / "ckpt-0000002" / "model.safetensors").is_file()
    tuned = GPTModel.load(out / "ckpt-0000002" / "model.safetensors")  # fine-tuned with a padded head
    assert tuned.config.vocab_size == tok.vocab_size and tuned.config.padded_vocab_size % 64 == 0
    assert torch.count_nonzero(tuned.tok_emb.weight[tok.vocab_size:]) == 0  # padding rows never trained
    # the fine-tuned run is itself a valid --init (its tokenizer is found next to it)
    assert saved_tokenizer_path(str(out)) == out / "tokenizer.json"

    assert main(["sft", "--init", str(tmp_path / "nowhere"), "--out-dir", str(out)]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    assert main(["sft", "--init", str(tmp_path / "run"), "--out-dir", str(out), "--vocab-multiple", "0"]) == 2
    assert "--vocab-multiple must be a positive integer" in capsys.readouterr().err


def test_a_resume_from_another_size_of_init_names_the_field_and_the_init(tmp_path, capsys):
    """sft has no --model: its model's size is --init's, and a resume whose --init is of another size is told the
    field that differs and the --init the run was trained with (it was told to pass a --model sft does not take)."""
    from tritongpt.cli import main

    recs = tasks.generate_tasks(8, seed=0, families="first_word")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    torch.manual_seed(0)
    for name, width in (("a", 32), ("b", 16)):  # the embedded tokenizer's vocabulary (no tokenizer.json beside them)
        (tmp_path / name).mkdir()
        GPTModel(GPTConfig(vocab_size=4100, context_length=256, n_embd=width, n_layer=1, n_head=2)).save(
            tmp_path / name / "model.safetensors")
    out = tmp_path / "sft"

    def sft(init, *extra):
        return main(["sft", "--init", str(tmp_path / init / "model.safetensors"), "--data", str(tmp_path / "d.jsonl"),
                     "--out-dir", str(out), "--batch-size", "2", "--eval-every", "0", "--eval-gen", "0",
                     "--sample-every", "0", "--val-fraction", "0.25", "--max-new-tokens", "2", "--device", "cpu", "--kernels", "reference",
                     *extra])

    assert sft("a", "--max-steps", "1") == 0
    capsys.readouterr()
    assert sft("b", "--max-steps", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert "the checkpoint's model has n_embd 32 (this run: 16); pass the --init " \
           f"{tmp_path / 'a' / 'model.safetensors'} it was trained with" in err, err
    assert "--model" not in err


def test_cli_reports_on_rank_0_only(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank runs cmd_sft; the others printed "checkpoint: None" (they write
    none) beside rank 0's report. A rank that is not the main one now prints no report."""
    from tritongpt.cli import main

    tok = small_bpe(tasks.generate_tasks(300, seed=1, families="first_word,last_word"))
    tok.save(tmp_path / "run" / "tokenizer.json")
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_embd=32, n_layer=1, n_head=1)).save(
        tmp_path / "run" / "model.safetensors")
    # what run_sft returns on rank 1: the Trainer's dict, no checkpoint, no test evaluation
    monkeypatch.setattr(sft, "run_sft", lambda *a, **k: {"is_main": False, "checkpoint": None, "step": 2})
    assert main(["sft", "--init", str(tmp_path / "run"), "--n-train", "4", "--n-eval", "2",
                 "--out-dir", str(tmp_path / "sft"), "--tasks", "first_word"]) == 0
    assert capsys.readouterr().out == ""


# -- boundaries and sums by hand (from a mutation pass) --
def test_encode_records_boundaries():
    tok, rec = CharTokenizer(), {"instruction": "i", "input": "", "output": "xy"}
    # ids = "ab" + "xy" + eot: 5 tokens = max_len + 1 with max_len 4: fits exactly, kept even with "drop"
    ex, _ = sft.encode_records([rec], tok, 4, "drop", template=lambda r: "ab")
    assert len(ex) == 1 and len(ex[0].ids) == 5
    # prompt of max_len tokens: truncation keeps one response token
    ex, _ = sft.encode_records([rec], tok, 3, "truncate", template=lambda r: "abc")
    assert [e.ids for e in ex] == [[97, 98, 99, ord("x")]]
    # prompt of max_len + 1 tokens: no response token left -> dropped
    ex, _ = sft.encode_records([rec], tok, 3, "truncate", template=lambda r: "abcd")
    assert ex == []


def test_heldout_loss_is_token_weighted():
    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return 3.0 * torch.nn.functional.one_hot(x, 8).float()

    data = sft.SFTData([sft.Example([1, 1], 1)], [sft.Example([1, 2, 3, 4, 5, 6, 7], 1), sft.Example([1, 1], 1)],
                       pad_id=0, batch_size=1)
    hit, miss = math.log1p(7 * math.exp(-3)), math.log(math.exp(3) + 7)
    assert sft.heldout_loss(Stub(), data) == pytest.approx((6 * miss + hit) / 7)  # 2.6226...
    # masked prompt targets and the padding of a shared batch count for nothing: [1, 2, 3 | 4 5 6 7]
    # counts the 4 targets 4..7 (inputs 3..6: misses), [1 | 1] its one (a hit), not the 6 + 5 - 1 others
    data = sft.SFTData([sft.Example([1, 1], 1)], [sft.Example([1, 2, 3, 4, 5, 6, 7], 3), sft.Example([1, 1], 1)],
                       pad_id=0, batch_size=2)
    assert len(list(data.val_batches())) == 1
    assert sft.heldout_loss(Stub(), data) == pytest.approx((4 * miss + hit) / 5)
    # no held-out batch at all: nan, not a loss of 0
    assert math.isnan(sft.heldout_loss(Stub(), sft.SFTData([sft.Example([1, 1], 1)], [], pad_id=0, batch_size=1)))


def test_sft_loss_is_the_sum_and_count_of_the_response_targets_only():
    """sft_loss: (summed cross-entropy of the counted targets, how many they are) of a collated
    batch, against a per-token sum by hand over the response tokens and the first eot; the prompt
    and the padding after the eot count for nothing."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=32, n_layer=1, n_head=2))
    examples = [Example([5, 6, 7, 8, 9, 128], 3), Example([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 128], 4),
                Example([11, 12, 128], 2)]
    x, y = collate(examples, pad_id=128)
    total, count = sft.sft_loss(model, (x, y))
    with torch.no_grad():
        logp = torch.log_softmax(model(x).float(), -1)
    want, n = 0.0, 0
    for i, e in enumerate(examples):
        for t in range(e.prompt_len - 1, len(e.ids) - 1):  # target t is token t + 1: response and eot
            want -= logp[i, t, e.ids[t + 1]].item()
            n += 1
    assert int(count) == n == 3 + 7 + 1
    assert float(total.detach()) == pytest.approx(want, rel=1e-5)
    # with label smoothing and the z-loss: -sum_j q_j log p_j + z lse^2 over the same tokens
    total, count = sft.sft_loss(model, (x, y), label_smoothing=0.2, z_loss=0.05)
    with torch.no_grad():
        lse = torch.logsumexp(model(x).float(), -1)
    want = 0.0
    for i, e in enumerate(examples):
        for t in range(e.prompt_len - 1, len(e.ids) - 1):
            want -= 0.8 * logp[i, t, e.ids[t + 1]].item() + 0.2 * logp[i, t].mean().item()
            want += 0.05 * lse[i, t].item() ** 2
    assert int(count) == n
    assert float(total.detach()) == pytest.approx(want, rel=1e-5)


def test_sft_trains_with_the_loss_options_and_evaluates_plain_cross_entropy(tmp_path, capsys, monkeypatch):
    """`sft --label-smoothing --z-loss` reach the training loss (every call of sft_loss), are
    recorded for a resume, and the held-out loss stays the plain cross-entropy."""
    from tritongpt.cli import main

    calls, plain = [], sft.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda m, b, **kw: calls.append(kw) or plain(m, b, **kw))
    recs = [{"instruction": f"w{i}", "input": "", "output": "ab"} for i in range(8)]
    model = GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=16, n_layer=1, n_head=2))
    result = sft.run_sft(model, CharTokenizer(), recs[:6], recs[6:], recs[6:], train_args(tmp_path, max_steps=2),
                         max_new_tokens=2, sample=False, template=lambda r: r["instruction"],
                         loss_options={"label_smoothing": 0.1, "z_loss": 1e-3})
    assert calls and all(kw == {"label_smoothing": 0.1, "z_loss": 1e-3} for kw in calls)
    ckpt = torch.load(Path(result["checkpoint"]) / "state.pt", weights_only=False)
    assert ckpt["args"]["label_smoothing"] == 0.1 and ckpt["args"]["z_loss"] == 1e-3
    val = sft.encode_records(recs[6:], CharTokenizer(), 16, "drop", "val", lambda r: r["instruction"])[0]
    data = sft.SFTData(val, val, CharTokenizer().eot_id, 2)
    assert result["val_loss"] == pytest.approx(sft.heldout_loss(model, data))
    # the CLI passes the flags on, checked before any work
    seen = {}
    monkeypatch.setattr(sft, "run_sft", lambda *a, **k: seen.update(k) or {"is_main": False})
    for flags, rc in ((["--label-smoothing", "0.25", "--z-loss", "2e-4"], 0), (["--label-smoothing", "-1"], 2)):
        assert main(["sft", "--init", "tiny", "--n-train", "4", "--n-eval", "2", "--tasks", "first_word",
                     "--out-dir", str(tmp_path / "cli"), *flags]) == rc
    assert seen["loss_options"] == {"label_smoothing": 0.25, "z_loss": 2e-4}
    assert "error: --label-smoothing must be in [0, 1], got -1.0" in capsys.readouterr().err


def test_greedy_responses_stop_flag_and_budget(monkeypatch):
    from tritongpt.train import generate as gen

    model = GPTModel(GPTConfig(vocab_size=129, context_length=32, n_embd=16, n_layer=1, n_head=2))
    asked = []

    def fake(model, idx, n, temperature=1.0, eos_id=None, **k):
        asked.append(n)
        return torch.cat([idx, torch.tensor([[52, 50]] * idx.size(0))], 1)  # "42", no eot

    monkeypatch.setattr(gen, "generate", fake)
    rec = {"instruction": "i", "input": "", "output": "42"}
    out = sft.greedy_responses(model, CharTokenizer(), [rec], max_new_tokens=8, template=lambda r: "p" * 30)
    assert out == [("42", False)] and asked == [2]  # 32 - 30 positions left
    rows, acc = sft.evaluate_responses(model, CharTokenizer(), [rec], 8, template=lambda r: "p" * 30)
    assert acc == 1.0 and rows[0]["stopped"] is False



def test_greedy_responses_draw_only_the_tokenizers_ids():
    """A model with more ids than its tokenizer (pick_tokenizer allows it): the greedy answer
    is the best id the tokenizer has. Unlimited, the model's favourite id 200 was drawn: the
    project's tokenizers refuse to decode it (scoring the held-out set ended the run with an
    error), this test's drops it (an empty answer, scored wrong)."""
    model = GPTModel(GPTConfig(vocab_size=256, context_length=32, n_embd=16, n_layer=1, n_head=2))
    with torch.no_grad():  # every hidden state is all ones: logits are the head's row sums
        model.final_norm.weight.zero_()
        model.final_norm.bias.fill_(1.0)
        model.out_head.weight.zero_()
        model.out_head.weight[200] = 2.0  # no token of CharTokenizer (129 ids)
        model.out_head.weight[ord("7")] = 1.0
    rec = {"instruction": "i", "input": "", "output": "777"}
    out = sft.greedy_responses(model, CharTokenizer(), [rec], max_new_tokens=3, template=lambda r: "p")
    assert out == [("777", False)]

def test_run_sft_caps_max_length_at_the_context(monkeypatch):

    seen = []

    def stop(records, tok, max_len, *a, **k):
        seen.append(max_len)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "encode_records", stop)
    model = GPTModel(GPTConfig(vocab_size=129, context_length=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(KeyboardInterrupt):
        sft.run_sft(model, CharTokenizer(), [], [], [], None, max_length=1000)
    assert seen == [32]


def test_every_family_answers_its_own_prompt():
    """Each family's gold answer recomputed from its instruction and input alone, with the sizes
    the module's table gives (numbers below 100, 2-4 words, 3-6 digits, "a,b,c" <-> "a b c")."""
    recs = tasks.generate_tasks(1500, seed=7, split=None)
    assert {r["task"] for r in recs} == set(tasks.FAMILIES)
    for r in recs:
        task, ins, inp, out = r["task"], r["instruction"], r["input"], r["output"]
        ws = inp.split()
        if task in ("add", "subtract", "max", "min"):
            xs = [int(x) for x in ws]
            assert all(0 <= x < 100 for x in xs), r
            assert len(xs) == 2 if task in ("add", "subtract") else 3 <= len(xs) <= 5, r
            want = {"add": xs[0] + xs[-1], "subtract": xs[0] - xs[-1], "max": max(xs), "min": min(xs)}[task]
            assert out == str(want), r
        elif task == "reverse_words":
            assert 2 <= len(ws) <= 4 and out == " ".join(ws[::-1]), r
        elif task == "sort_words":
            assert 2 <= len(ws) <= 4 and out == " ".join(sorted(ws)), r
        elif task == "sort_digits":
            assert 3 <= len(ws) <= 6 and all(len(d) == 1 and d.isdigit() for d in ws), r
            assert out == " ".join(sorted(ws, key=int)), r
        elif task == "count_words":
            assert out == str(len(ws)), r
        elif task == "count_letter":
            letter = ins.removeprefix("Count the letter ").removesuffix(" in the text.")
            assert letter in tasks.LETTERS and out == str(inp.count(letter)), r
        elif task == "uppercase":
            assert 1 <= len(ws) <= 3 and inp == inp.lower() and out == inp.upper(), r
        elif task == "lowercase":  # the words come in capitals: there is something to convert
            assert 1 <= len(ws) <= 3 and inp == inp.upper() and out == inp.lower() and out != inp, r
        elif task == "commas_to_spaces":
            assert " " not in inp and out == inp.replace(",", " ") and len(out.split()) >= 2, r
        elif task == "spaces_to_commas":
            assert "," not in inp and out == inp.replace(" ", ",") and len(ws) >= 2, r
        elif task == "first_word":
            assert 2 <= len(ws) <= 5 and out == ws[0], r
        elif task == "last_word":
            assert 2 <= len(ws) <= 5 and out == ws[-1], r


def test_task_family_lists_splits_and_counts():
    assert tasks.parse_families("all") == tasks.parse_families(None) == tuple(tasks.FAMILIES)  # sft --tasks' default
    # a family named twice is one family, not twice the share of the draws
    assert tasks.parse_families(" last_word, first_word ,last_word") == ("last_word", "first_word")
    for spec in (",", " , "):  # names nothing: a user error, not a crash in the generator
        with pytest.raises(UserError, match="unknown task famil"):
            tasks.generate_tasks(3, families=spec)
    assert tasks.generate_tasks(0) == []  # "must be >= 0"
    with pytest.raises(UserError, match="must be >= 0, got -1"):
        tasks.generate_tasks(-1)
    with pytest.raises(UserError, match="unknown split 'dev'"):
        tasks.generate_tasks(3, split="dev")


def test_wrong_answer_of_a_file_record_with_a_number_like_gold():
    """A gold that str.isdigit takes ("²") or that is digits after several minus signs ("--5") is
    not an integer int() reads: it gets a wrong word, not a ValueError; integers stay off by one."""
    for gold in ("--5", "²", "-"):
        w = tasks.wrong_answer({"instruction": "x", "input": "", "output": gold}, random.Random(1))
        assert w.strip() and not tasks.exact_match(w, gold), (gold, w)
    for gold in ("-3", "007", "٣"):  # (int() reads the Arabic-Indic 3 as 3)
        w = tasks.wrong_answer({"instruction": "x", "input": "", "output": gold}, random.Random(1))
        assert abs(int(w) - int(gold)) == 1, (gold, w)


def test_unit_hash_stays_below_one_for_the_largest_digests(monkeypatch):
    """A digest starting with eight 0xff bytes: 64 bits over 2**64 rounded to 1.0, outside every split."""
    import hashlib
    import types

    class Top:
        def __init__(self, data):
            pass

        def digest(self):
            return b"\xff" * 32

    monkeypatch.setattr(tasks, "hashlib", types.SimpleNamespace(sha256=Top))
    assert 0.9 < tasks.unit_hash("any") < 1.0
    assert tasks.split_of({"instruction": "Give the first word.", "input": "cat dog"}) == "test"
    monkeypatch.setattr(tasks, "hashlib", hashlib)
    # below the top 53 bits nothing moves: a split fixed before stays as it was
    digest = int.from_bytes(hashlib.sha256(b"Give the first word.\ncat dog").digest()[:8], "big")
    assert tasks.unit_hash("Give the first word.\ncat dog") == pytest.approx(digest / 2**64, abs=2**-52)


def test_exact_match_strips_both_sides_and_nothing_else():
    assert tasks.exact_match("42", " 42\n")         # the gold's surrounding whitespace does not count either
    assert not tasks.exact_match("cat", "CAT")      # case is the answer of the uppercase/lowercase tasks
    assert not tasks.exact_match("1  2", "1 2")     # inner whitespace is part of the answer
    assert not tasks.exact_match("a,b", "a b")
    assert tasks.exact_match("42", None) is False and tasks.exact_match(None, None) is False


def test_wrong_answers_make_the_mistake_each_family_names():
    """Off by one (never below 0), another number of the list, two items swapped or the input as
    given, exactly one word left unconverted, the separators half or not converted."""
    recs = tasks.generate_tasks(1500, seed=11, split=None)
    rng = random.Random(5)
    half = 0
    for r in recs:
        task, inp, gold = r["task"], r["input"], r["output"]
        w = tasks.wrong_answer(r, rng)
        assert not tasks.exact_match(w, gold), r
        g, ws = gold.split(), w.split()
        if task in ("add", "subtract", "count_words", "count_letter"):
            assert w.isdigit() and abs(int(w) - int(gold)) == 1, (r, w)
        elif task in ("max", "min"):
            assert w.isdigit() and (abs(int(w) - int(gold)) == 1 or w in inp.split()), (r, w)
        elif task in ("reverse_words", "sort_words", "sort_digits"):
            moved = [k for k in range(len(g)) if len(ws) == len(g) and ws[k] != g[k]]
            if len(set(g)) > 1:  # (an all-equal list has nothing to swap)
                assert w == inp or (sorted(ws) == sorted(g) and len(moved) == 2), (r, w)
        elif task in ("uppercase", "lowercase"):
            moved = [k for k in range(len(g)) if ws[k] != g[k]]
            assert len(ws) == len(g) and len(moved) == 1 and ws[moved[0]] == inp.split()[moved[0]], (r, w)
        elif task in ("commas_to_spaces", "spaces_to_commas"):
            old, new = (",", " ") if task == "commas_to_spaces" else (" ", ",")
            if w != inp:  # half converted: only with 3+ words
                assert inp.count(old) >= 2 and w == inp.replace(old, new, 1), (r, w)
                half += 1
        elif task in ("first_word", "last_word"):
            assert w in tasks.WORDS, (r, w)
    assert half > 0
    # an all-equal list has no two items to swap
    rec = {"instruction": "Sort the digits from smallest to largest.", "input": "3 3 3", "output": "3 3 3",
           "task": "sort_digits"}
    assert all(not tasks.exact_match(tasks.wrong_answer(rec, random.Random(s)), "3 3 3") for s in range(20))
    # records from a file: a negative number is still a number; any gold, even empty, gets a different answer
    for gold in ("-3", "yes yes", "", "  "):
        for s in range(5):
            w = tasks.wrong_answer({"instruction": "x", "input": "", "output": gold}, random.Random(s))
            assert not tasks.exact_match(w, gold), (gold, w)
            if gold == "-3":
                assert w in ("-2", "-4")


# -- records, splits, wiring and task ranges by hand (from a second mutation pass) --
def test_read_records_keep_a_string_task_and_read_a_null_input_as_empty(tmp_path):
    """A file's "task" (a string) stays on the record, so the responses and the by-task scores
    name it; a non-string one is dropped; "input": null is no input."""
    recs = [{"instruction": "Add.", "input": None, "output": "3", "task": "add"},
            {"instruction": "Say hi.", "output": "hi", "task": 7}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    assert sft.read_records(tmp_path / "d.json") == [
        {"instruction": "Add.", "input": "", "output": "3", "task": "add"},
        {"instruction": "Say hi.", "input": "", "output": "hi"}]


def test_split_records_edges():
    """--val-fraction 0 holds nothing out; a prompt is instruction + input (records that share an
    instruction are split by their inputs); when every prompt hashes into the held-out share,
    training still keeps one."""
    recs = [{"instruction": "Echo.", "input": str(i), "output": str(i)} for i in range(200)]
    assert sft.split_records(recs, 0.0) == (recs, [])
    train, val = sft.split_records(recs, 0.5)
    assert 60 <= len(val) <= 140 and len(train) + len(val) == 200
    two = [{"instruction": "Echo.", "input": s, "output": s} for s in ("a", "b")]
    assert all(tasks.prompt_hash(r) < 0.999 for r in two)  # both hash into a 0.999 share
    train, val = sft.split_records(two, 0.999)
    assert len(train) == 1 and len(val) == 1
    assert sft.split_records(two[:1], 0.999) == (two[:1], [])  # a single prompt always trains


def test_task_splits_are_train_val_and_test():
    train, val, test = sft.task_splits(40, 30, seed=2, families="add,max")
    assert (len(train), len(val), len(test)) == (40, 30, 30)
    for recs, name in ((train, "train"), (val, "val"), (test, "test")):
        assert {tasks.split_of(r) for r in recs} == {name}
        assert {r["task"] for r in recs} == {"add", "max"}


def test_encode_records_keeps_special_spellings_as_text_and_checks_overlong():
    """"<|endoftext|>" inside a record is text: the one eot id is the appended one."""
    tok = small_bpe(tasks.generate_tasks(100, seed=1, families="first_word"), vocab_size=300)
    rec = {"instruction": "Say <|endoftext|>.", "input": "", "output": "a<|endoftext|>b"}
    (ex,), _ = sft.encode_records([rec], tok, 500)
    assert ex.ids.count(tok.eot_id) == 1 and ex.ids[-1] == tok.eot_id
    assert tok.decode(ex.ids[:-1]) == format_prompt(rec) + "a<|endoftext|>b"
    with pytest.raises(UserError, match="--overlong must be drop or truncate, got 'cut'"):
        sft.encode_records([rec], tok, 500, overlong="cut")


def test_sft_data_batches_honour_mask_prompt_and_val_is_length_sorted():
    ex = [Example([5, 6, 7, 128], 2)]
    for mask, want in ((True, [-100, 7, 128]), (False, [6, 7, 128])):
        d = sft.SFTData(ex, ex, pad_id=128, batch_size=1, mask_prompt=mask)
        assert d.get_batch("train")[1].tolist() == [want]
        assert next(d.val_batches())[1].tolist() == [want]
    # held-out batches of similar lengths: 40 distinct lengths 3..42 in batches of 4 pad 0+1+2+3 each
    lengths = list(range(3, 43))
    random.Random(0).shuffle(lengths)
    d = sft.SFTData(ex, [Example(list(range(n)), 1) for n in lengths], pad_id=0, batch_size=4)
    padding = sum(x.shape[0] * (x.shape[1] + 1) for x, _ in d.val_batches()) - sum(lengths)
    assert padding == 10 * 6


def test_sft_data_as_many_batches_as_ranks_gives_each_rank_its_own():
    examples = [Example([1, 2, 1000 + i], 1) for i in range(6)]  # 3 batches of 2, 3 ranks
    taken = []
    for r in range(3):
        d = sft.SFTData(examples, [], pad_id=-1, batch_size=2, seed=1, rank=r, world_size=3)
        _, y = d.get_batch("train")[:2]
        assert len(d._order) == 1
        taken += [int(t) - 1000 for t in y.flatten() if t >= 1000]
    assert sorted(taken) == list(range(6))


class EotTokenizer(CharTokenizer):
    """CharTokenizer that spells the eot out when decoding it, as the project's tokenizers do."""
    def decode(self, ids):
        return "".join("<|endoftext|>" if i == 128 else chr(i) for i in ids)


def test_greedy_responses_cut_at_the_eot_and_name_the_task(monkeypatch):
    from tritongpt.train import generate as gen

    model = GPTModel(GPTConfig(vocab_size=129, context_length=32, n_embd=16, n_layer=1, n_head=2))

    def fake(model, idx, n, temperature=1.0, eos_id=None, **k):  # "42" then eot as the last token
        return torch.cat([idx, torch.tensor([[52, 50, 128]] * idx.size(0))], 1)

    monkeypatch.setattr(gen, "generate", fake)
    recs = [{"instruction": "i", "input": "", "output": "42", "task": "add"},
            {"instruction": "j", "input": "", "output": "7"}]
    rows, acc = sft.evaluate_responses(model, EotTokenizer(), recs, 3, template=lambda r: r["instruction"])
    assert [(r["prediction"], r["stopped"], r["correct"]) for r in rows] == [("42", True, True), ("42", True, False)]
    assert rows[0]["task"] == "add" and "task" not in rows[1] and acc == 0.5


def test_per_task_accuracy_by_hand():
    rows = [{"task": "add", "correct": True}, {"task": "add", "correct": False}, {"task": "max", "correct": True},
            {"task": "add", "correct": True}]
    assert sft.per_task_accuracy(rows) == {"add": pytest.approx(2 / 3), "max": 1.0}
    assert sft.per_task_accuracy([{"correct": True}, {"correct": False}]) == {"all": 0.5}


def test_run_sft_passes_its_settings_on(tmp_path, monkeypatch):
    """overlong for every split, the seed to the batches, eval_batches to the held-out loss,
    eval_gen held-out records and max_new_tokens to each evaluation, the final one on the test set."""
    calls = {"encode": [], "seed": [], "heldout": [], "eval": []}
    real_encode, real_data, real_heldout, real_eval = (sft.encode_records, sft.SFTData, sft.heldout_loss,
                                                       sft.evaluate_responses)

    def encode(records, tok, max_len, overlong="drop", what="records", template=format_prompt):
        calls["encode"].append((what, overlong))
        return real_encode(records, tok, max_len, overlong, what, template)

    def data(*a, seed=0, **k):
        calls["seed"].append(seed)
        return real_data(*a, seed=seed, **k)

    def heldout(m, d, max_batches=None):
        calls["heldout"].append(max_batches)
        return real_heldout(m, d, max_batches)

    def evaluate(m, tok, records, max_new_tokens=32, batch_size=32, template=format_prompt):
        calls["eval"].append((len(records), max_new_tokens))
        return real_eval(m, tok, records, max_new_tokens, batch_size, template)

    for name, f in (("encode_records", encode), ("SFTData", data), ("heldout_loss", heldout),
                    ("evaluate_responses", evaluate)):
        monkeypatch.setattr(sft, name, f)
    recs = [{"instruction": f"w{i}", "input": "", "output": "ab"} for i in range(12)]
    model = GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=16, n_layer=1, n_head=2))
    args = train_args(tmp_path, max_steps=1, batch_size=2, eval_every=1, eval_batches=2, seed=7)
    sft.run_sft(model, CharTokenizer(), recs[:4], recs[4:9], recs[9:], args, overlong="drop",
                max_new_tokens=3, eval_gen=2, sample=False, template=lambda r: r["instruction"])
    assert calls["encode"] == [("train", "drop"), ("val", "drop"), ("test", "drop")]
    assert calls["seed"] == [7] and set(calls["heldout"]) == {2}
    assert set(calls["eval"][:-1]) == {(2, 3)} and calls["eval"][-1] == (3, 3)
    with pytest.raises(UserError, match="--max-length must be at least 2, got 1"):
        sft.run_sft(model, CharTokenizer(), recs, [], [], args, max_length=1)


def test_eval_before_is_skipped_on_resume(tmp_path):
    recs = [{"instruction": f"w{i}", "input": "", "output": "ab"} for i in range(8)]
    model = GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=16, n_layer=1, n_head=2))
    kw = dict(max_new_tokens=2, eval_before=True, sample=False, template=lambda r: r["instruction"])
    first = sft.run_sft(model, CharTokenizer(), recs[:6], [], recs[6:], train_args(tmp_path, max_steps=1), **kw)
    assert first["exact_match_before"] is not None
    again = sft.run_sft(model, CharTokenizer(), recs[:6], [], recs[6:],
                        train_args(tmp_path, max_steps=2, resume="latest"), **kw)
    assert again["step"] == 2 and again["exact_match_before"] is None
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "test_exact_match" in m] == [0, 1, 2]


def test_overwrite_keeps_the_new_runs_eval_before_row(tmp_path):
    """--overwrite clears the old run before the row of the exact match measured before training, not
    at the start of training, which deleted that row."""
    recs = [{"instruction": f"w{i}", "input": "", "output": "ab"} for i in range(8)]
    model = GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=16, n_layer=1, n_head=2))
    kw = dict(max_new_tokens=2, eval_before=True, sample=False, template=lambda r: r["instruction"])
    for overwrite in (False, True):
        sft.run_sft(model, CharTokenizer(), recs[:6], [], recs[6:], train_args(tmp_path, max_steps=1,
                                                                                 overwrite=overwrite), **kw)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "test_exact_match" in m] == [0, 1]


def test_cli_checks_counts_and_seeds_the_tasks(tmp_path, capsys, monkeypatch):
    from tritongpt.cli import main

    flags = ["sft", "--init", "tiny", "--tokenizer", "default", "--out-dir", str(tmp_path)]
    quick = ["--max-steps", "1", "--n-train", "2", "--n-eval", "1", "--max-new-tokens", "1", "--eval-every", "0"]
    for flag in ("--max-new-tokens", "--n-train"):
        assert main(flags + quick + [flag, "0"]) == 2  # (the last of a flag counts)
        assert f"{flag} must be positive, got 0" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(sft, "run_sft", lambda m, t, train, val, test, *a, **k: seen.update(
        train=train, val=val, test=test) or {"is_main": False})
    assert main(flags + ["--n-train", "5", "--n-eval", "3", "--tasks", "add", "--seed", "3"]) == 0
    assert seen == dict(zip(("train", "val", "test"), sft.task_splits(5, 3, seed=3, families="add")))
    assert seen["train"] != sft.task_splits(5, 3, seed=0, families="add")[0]


def test_task_sizes_reach_both_ends_of_the_documented_ranges():
    """The module's table: numbers below 100 (0 and 99 both drawn), 3-6 digits (every digit),
    2-4 / 1-3 / 2-5 words, "a,b,c" <-> "a b c" of 2-4 words."""
    recs = tasks.generate_tasks(3000, seed=3, split=None)
    sizes, numbers, digits, letters, text_letters = {}, set(), set(), set(), set()
    for r in recs:
        task, inp = r["task"], r["input"]
        ws = inp.replace(",", " ").split()
        sizes.setdefault(task, set()).add(len(ws))
        if task in ("add", "subtract", "max", "min"):
            numbers.update(int(w) for w in ws)
        elif task == "sort_digits":
            digits.update(ws)
        elif task == "count_letter":
            letters.add(r["instruction"].removeprefix("Count the letter ").removesuffix(" in the text."))
            text_letters.update(inp)
    assert numbers == set(range(100)) and digits == set("0123456789")
    assert letters == text_letters == set(tasks.LETTERS)  # every letter asked for, every letter in the texts
    want = {"reverse_words": range(2, 5), "sort_words": range(2, 5), "sort_digits": range(3, 7),
            "uppercase": range(1, 4), "lowercase": range(1, 4), "commas_to_spaces": range(2, 5),
            "spaces_to_commas": range(2, 5), "first_word": range(2, 6), "last_word": range(2, 6)}
    for task, rng in want.items():
        assert sizes[task] == set(rng), (task, sizes[task])


def test_exact_match_refuses_near_misses():
    """Only surrounding whitespace is forgiven: not a leading zero, a sign, a trailing period or
    a second line; a non-string is never a match."""
    for pred, gold in (("042", "42"), ("-5", "5"), ("+5", "5"), ("42.", "42"), ("42\n43", "42"),
                       ("42\n\nfoo", "42"), ("0", "00")):
        assert not tasks.exact_match(pred, gold), (pred, gold)
    assert tasks.exact_match("\t42 \r\n", "42") and tasks.exact_match("-5", " -5")
    assert tasks.exact_match(42, "42") is False and tasks.exact_match("42", 42) is False



def test_only_json_lines_in_a_json_file_are_told_to_be_named_jsonl(tmp_path):
    """The '.jsonl' hint is for a JSON Lines file named .json (json's 'Extra data'); a broken
    JSON file is not told to be JSON Lines (from a mutation audit)."""
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x",')
    with pytest.raises(UserError, match=r"bad.json: not valid JSON") as e:
        sft.read_records(bad)
    assert ".jsonl" not in str(e.value)


# -- packing (sft --packing) ---------------------------------------------------------------------------
def packing_examples(n, seed, max_size=14):
    """Examples of 0..max_size input tokens (ids < 128, eot 128 last), prompts of every length,
    some with a context range (a chat's later user turn) after the prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.randint(0, max_size)
        ids = [rng.randrange(128) for _ in range(size)] + [128]
        prompt_len = rng.randint(0, size)
        context = ((prompt_len + 1, prompt_len + 3),) if prompt_len + 3 <= size and rng.random() < 0.4 else ()
        out.append(Example(ids, prompt_len, context))
    return out


def test_best_fit_decreasing_by_hand():
    # sizes 5 4 3 3 2 1 in rows of 6: 5 | 4 | 3, then the second 3 into the row with room 3 (the
    # least room that holds it), the 2 into room 2, the 1 into room 1: three full rows
    assert sft.best_fit_decreasing(range(6), [5, 4, 3, 3, 2, 1], 6) == [[0, 5], [1, 4], [2, 3]]
    # equal sizes keep the items' order; an item of the whole capacity fills a row alone
    assert sft.best_fit_decreasing([3, 1, 2, 0], [2, 2, 2, 6], 6) == [[3], [1, 2, 0]]
    # 6 | 4 + 3 in rows of 8, then the 1 into the row with room 1: not the first row that holds it
    # (first fit), nor the roomiest (worst fit), both the row with room 2
    assert sft.best_fit_decreasing(range(4), [6, 4, 3, 1], 8) == [[0], [1, 2, 3]]
    assert sft.best_fit_decreasing([], [], 6) == []


def test_packed_batches_hold_every_example_once_in_nearly_full_rows():
    rng = random.Random(3)
    sizes = [rng.randint(0, 48) for _ in range(600)]
    for pool_batches in (50, 1):  # one pool, and many small ones
        batches = sft.packed_batches(sizes, 48, 8, torch.Generator().manual_seed(1), pool_batches)
        rows = [row for b in batches for row in b]
        assert sorted(i for row in rows for i in row) == list(range(600))  # each example exactly once
        assert all(sum(sizes[i] for i in row) <= 48 for row in rows)
        assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1) and 1 <= len(batches[-1]) <= 8
        padding = 1 - sum(sizes) / (48 * len(rows))
        print(f"pool_batches {pool_batches}: {len(rows)} rows, padding {padding:.3f}")
        assert padding < (0.05 if pool_batches == 50 else 0.15)  # small pools leave more room
    # the generator decides everything
    again = sft.packed_batches(sizes, 48, 8, torch.Generator().manual_seed(1))
    other = sft.packed_batches(sizes, 48, 8, torch.Generator().manual_seed(2))
    assert again == sft.packed_batches(sizes, 48, 8, torch.Generator().manual_seed(1)) and other != again


def test_packed_batches_pools_and_shuffles():
    """A pool closes once it holds a batch's rows' worth of tokens, and is packed into full rows;
    the generator decides which examples share a row (the shuffle before the pools) and the
    rows' order (the shuffle after packing, or they would come largest first)."""
    for seed in range(5):  # pools of exactly one row's worth (8 tokens): two full rows of two
        rows = [row for b in sft.packed_batches([4] * 4, 8, 1, torch.Generator().manual_seed(seed), 1) for row in b]
        assert sorted(len(row) for row in rows) == [2, 2]
    rng = random.Random(3)
    sizes = [rng.randint(1, 48) for _ in range(600)]

    def rows_of(seed, pool_batches):
        return [row for b in sft.packed_batches(sizes, 48, 8, torch.Generator().manual_seed(seed), pool_batches)
                for row in b]

    assert {frozenset(r) for r in rows_of(1, 1)} != {frozenset(r) for r in rows_of(2, 1)}
    largest = [sizes[row[0]] for row in rows_of(1, 50)]  # one pool: best-fit decreasing opens rows largest first
    assert largest != sorted(largest, reverse=True)


def test_collate_packed_lays_out_each_example_as_collate_does():
    """Every row is exactly row_len tokens; doc_ids runs are its examples (then its padding, an id
    of its own); each run's inputs and targets are collate's row for that example alone, so no
    target runs from one example into the next and the masking is collate's."""
    examples = packing_examples(40, seed=4)
    rows = sft.best_fit_decreasing(range(40), [len(e.ids) - 1 for e in examples], 20)
    for mask in (True, False):
        x, y, doc = sft.collate_packed([[examples[i] for i in row] for row in rows], 20, pad_id=128,
                                       mask_prompt=mask)
        assert x.shape == y.shape == doc.shape == (len(rows), 20) and doc.dtype == torch.long
        for r, row in enumerate(rows):
            at = 0
            for j, i in enumerate(row):
                e = examples[i]
                n = len(e.ids) - 1
                want_x, want_y = collate([e], pad_id=128, mask_prompt=mask)
                assert doc[r, at:at + n].tolist() == [j] * n
                assert x[r, at:at + n].tolist() == want_x[0].tolist()
                assert y[r, at:at + n].tolist() == want_y[0].tolist()
                at += n
            assert doc[r, at:].tolist() == [len(row)] * (20 - at)  # padding: its own run
            assert (x[r, at:] == 128).all() and (y[r, at:] == -100).all()
    # a by-hand row: [5 6 | 7 8 9 eot] and [1 2 eot] with prompts of 2 and 1 in 12 tokens
    x, y, doc = sft.collate_packed([[Example([5, 6, 7, 8, 9, 128], 2), Example([1, 2, 128], 1)]], 12, pad_id=0)
    assert x.tolist() == [[5, 6, 7, 8, 9, 1, 2, 0, 0, 0, 0, 0]]
    assert y.tolist() == [[-100, 7, 8, 9, 128, 2, 128, -100, -100, -100, -100, -100]]  # 128 never targets 1
    assert doc.tolist() == [[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2]]
    with pytest.raises(ValueError, match="more than 6"):
        sft.collate_packed([[Example([5, 6, 7, 8, 9, 128], 2), Example([1, 2, 128], 1)]], 6, pad_id=0)


def test_sft_data_packing_epochs_ranks_and_resume():
    examples = packing_examples(90, seed=5)
    n_rows = len(sft.best_fit_decreasing(range(90), [len(e.ids) - 1 for e in examples], 16))

    def data(**kw):
        return sft.SFTData(examples, examples[:5], pad_id=128, batch_size=4, seed=5, pack_len=16, **kw)

    d = data()
    x, y, doc, lengths = d.get_batch("train")
    assert x.shape == y.shape == doc.shape == (4, 16)
    # each row's real tokens: its examples' inputs, before the padding (doc id len(row))
    assert lengths.tolist() == [sum(len(examples[i].ids) - 1 for i in row) for row in d._order[0]]
    order = d._order
    # --no-mask-prompt reaches the packed rows: the same rows, every target learned
    xu, yu, *_ = data(mask_prompt=False).get_batch("train")
    want = sft.collate_packed([[examples[i] for i in row] for row in order[0]], 16, 128, mask_prompt=False)
    assert torch.equal(xu, x) and torch.equal(yu, want[1]) and not torch.equal(yu, y)
    rows = [row for b in order for row in b]
    assert sorted(i for row in rows for i in row) == list(range(90))  # an epoch: every example once
    assert len(rows) == n_rows and len(order) == math.ceil(n_rows / 4)  # one pool of 90: what BFD gives
    assert d.layout(16)[:2] == (len(rows), len(order)) and d.layout(None)[:2] == (90, math.ceil(90 / 4))
    for _ in range(len(order) - 1):
        x, y, doc, _ = d.get_batch("train")
        assert x.shape[1] == 16
    assert d.epoch == 0 and d._order == order
    d.get_batch("train")
    assert d.epoch == 1 and d._order != order  # each epoch packed and ordered anew
    assert data()._epoch_order(d._seed_of(0)) == order  # (seed, epoch) decide it
    other = sft.SFTData(examples, [], 128, 4, seed=6, pack_len=16)
    assert other._epoch_order(other._seed_of(0)) != order
    # held-out batches stay unpacked: collate's (inputs, targets), as without --packing
    plain = sft.SFTData(examples, examples[:5], pad_id=128, batch_size=4)
    for got, want in zip(d.val_batches(), plain.val_batches(), strict=True):
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))

    # 3 ranks: disjoint shares of one packed epoch, in lockstep
    ranks = [data(rank=r, world_size=3) for r in range(3)]
    for rd in ranks:
        rd.get_batch("train")
    assert len({len(rd._order) for rd in ranks}) == 1
    flat = [i for rd in ranks for b in rd._order for row in b for i in row]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(90))
    assert [rd._order for rd in ranks] == [order[:len(order) - len(order) % 3][r::3] for r in range(3)]

    # resume: the same batches, across an epoch's end
    d = data()
    for _ in range(len(order) - 2):
        d.get_batch("train")
    state = d.state_dict()
    assert state["pack_len"] == 16
    rest = [d.get_batch("train") for _ in range(5)]
    resumed = data()
    resumed.load_state_dict(state)
    for want, got in zip(rest, (resumed.get_batch("train") for _ in range(5))):
        assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(want, got))
    # a resume that turns packing on (or off) goes on as far into the epoch as the run had gone
    unpacked = sft.SFTData(examples, [], pad_id=128, batch_size=4, seed=5)
    for _ in range(10):
        unpacked.get_batch("train")
    packed = data()
    packed.load_state_dict(unpacked.state_dict())
    assert packed.pos == 10 * len(order) // len(unpacked._order) and packed._order == order
    back = sft.SFTData(examples, [], pad_id=128, batch_size=4, seed=5)
    back.load_state_dict(packed.state_dict())
    assert back.pos == packed.pos * len(unpacked._order) // len(order) and back._order == unpacked._order
    with pytest.raises(UserError, match="an example of 14 tokens does not fit in a packed row of 13"):
        sft.SFTData(examples, [], 128, 4, pack_len=13)


def test_a_packing_switch_resumes_rounding_down_and_from_old_states():
    """A resume that turns packing on goes on at the floor of the share of the epoch the run had
    taken (repeating a little, skipping nothing), from every position; a state from before
    --packing (no pack_len) is unpacked; one from before any batch starts the epoch."""
    examples = packing_examples(90, seed=5)
    packed = sft.SFTData(examples, [], 128, batch_size=4, seed=5, pack_len=16)
    unpacked = sft.SFTData(examples, [], 128, batch_size=4, seed=5)
    packed.load_state_dict(unpacked.state_dict())
    assert packed.pos == 0 and packed._order is None
    n_packed, n_plain = (len(d._epoch_order(d._seed_of(0))) for d in (packed, unpacked))
    assert n_plain % n_packed  # the ratio has a remainder: the rounding matters
    for pos in range(1, n_plain + 1):
        unpacked.get_batch("train")
        state = unpacked.state_dict()
        if pos % 2:
            del state["pack_len"]  # a checkpoint from before --packing
        packed.load_state_dict(state)
        assert packed.pos == pos * n_packed // n_plain


def _epoch_figures(d):
    """(rows, batches, padding) of the epoch d draws next, from its batches as they come out."""
    batches = [d.get_batch("train")]
    batches += [d.get_batch("train") for _ in range(len(d._order) - 1)]
    return sum(len(b[0]) for b in batches), len(batches), 1 - sum(d.sizes) / sum(b[0].numel() for b in batches)


def test_layout_is_the_first_epochs():
    """layout (the start line's figures) is the first epoch's, packed or not: its rows, batches and
    padding as its batches come out (several pools, so another epoch's differ)."""
    examples = packing_examples(300, seed=9)
    for pack_len in (16, None):
        d = sft.SFTData(examples, [], 128, batch_size=2, seed=3, world_size=1, pack_len=pack_len)
        first, second = _epoch_figures(d), _epoch_figures(d)
        assert d.layout(pack_len) == pytest.approx(first) and first != second


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_packed_loss_is_the_sum_of_the_examples_alone(path):
    """The key check of --packing: sft_loss on the packed batches of an epoch is the sum of sft_loss
    on each example alone, unpacked (and so are its gradients), fp32, on both kernel paths. Without
    doc_ids reaching the model the examples of a row would see each other and it would not be."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=129, context_length=24, n_embd=32, n_layer=1, n_head=2))
    model.set_kernels(path)
    examples = packing_examples(6, seed=5, max_size=24)
    data = sft.SFTData(examples, [], pad_id=128, batch_size=2, pack_len=24)
    packed = [data.get_batch("train")]
    packed += [data.get_batch("train") for _ in range(len(data._order) - 1)]
    assert sum(x.shape[0] for x, *_ in packed) < 6  # rows shared: something was packed
    sums, grads, counts = [], [], []
    for batches in (packed, [collate([e], pad_id=128) for e in examples]):
        model.zero_grad()
        total, count = 0.0, 0
        for batch in batches:
            loss, n = sft.sft_loss(model, batch)
            loss.backward()
            total, count = total + loss.detach().double(), count + int(n)
        sums.append(total.reshape(1))
        counts.append(count)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    assert counts[0] == counts[1] > 0
    assert_close_rel(sums[0], sums[1], 1e-5, f"{path}: packed loss sum vs the examples alone")
    assert_close_rel(grads[0], grads[1], 1e-5, f"{path}: its gradients")
    # the check has teeth: the same rows without doc_ids (examples seeing each other) differ
    with torch.no_grad():
        mixed = sum(float(sft.sft_loss(model, (x, y))[0]) for x, y, *_ in packed)
    gap = abs(mixed - float(sums[1])) / abs(float(sums[1]))
    assert gap > 1e-4  # 2.5e-3 here; 1e-4 is 10x the tolerance
    if path == "triton":
        assert model.kernels == frozenset(KERNEL_NAMES)

def _packed_sft_as_rank(rank, out, rec, port, state):
    """One of two torchrun-like gloo processes running one packed SFT step through the Trainer."""
    from test_loop import _as_torchrun_rank

    _as_torchrun_rank(rank, port)
    model = GPTModel(GPTConfig(**state["config"]))
    model.load_state_dict(state["weights"])
    data = sft.SFTData(packing_examples(30, seed=7, max_size=24), [], 128, batch_size=2, pack_len=24)  # rank: env
    taken = []

    def get_batch(split, generator=None):
        batch = data.get_batch(split)
        taken.append(data._order[data.pos - 1])
        return batch

    trainer = Trainer(model, train_args(out, max_steps=1, grad_accum=2), sft.sft_loss, get_batch, name="sft",
                      data_state=data)
    result = trainer.fit()
    torch.save({"loss": result["loss"], "taken": taken, "world": trainer.world_size,
                "params": torch.cat([p.detach().flatten() for p in model.parameters()])}, Path(rec) / f"rank{rank}.pt")


def test_packed_sft_under_ddp_with_grad_accum_is_the_one_process_step(tmp_path):
    """Two gloo processes, each two packed micro-batches (doc_ids through the Trainer, the device
    move, DDP's forward and the accumulation), take between them the first four batches of the
    epoch, disjointly, and log the loss one process gets from those four as one step."""
    from test_loop import _run_ddp

    torch.manual_seed(8)
    config = dict(vocab_size=129, context_length=24, n_embd=32, n_layer=2, n_head=2)
    model = GPTModel(GPTConfig(**config))
    state = {"config": config, "weights": {k: v.clone() for k, v in model.state_dict().items()}}
    data = sft.SFTData(packing_examples(30, seed=7, max_size=24), [], 128, batch_size=2, pack_len=24, world_size=1)
    one = Trainer(model, train_args(tmp_path / "one", max_steps=1, grad_accum=4), sft.sft_loss, data.get_batch,
                  name="sft").fit()
    order = data._order
    r0, r1 = _run_ddp(tmp_path / "ddp", tmp_path / "rec", _packed_sft_as_rank, **state)
    assert r0["world"] == r1["world"] == 2
    assert r0["taken"] == [order[0], order[2]] and r1["taken"] == [order[1], order[3]]
    assert torch.equal(r0["params"], r1["params"])  # one averaged gradient
    assert r0["loss"] == pytest.approx(one["loss"], rel=1e-6) and r1["loss"] == r0["loss"]


def test_cli_packing_reaches_sft_data_and_is_recorded(tmp_path, monkeypatch, capsys):
    """`sft --packing` reaches run_sft, which packs rows of the examples' max_len (the context, or
    --max-length) and records the flag with the run."""
    from tritongpt.cli import main

    seen = {}
    real_run = sft.run_sft
    monkeypatch.setattr(sft, "run_sft", lambda *a, **k: seen.update(k) or {"is_main": False})
    for flags, want in (([], False), (["--packing"], True)):
        assert main(["sft", "--init", "tiny", "--n-train", "4", "--n-eval", "2", "--tasks", "first_word",
                     "--out-dir", str(tmp_path / "cli"), *flags]) == 0
        assert seen["packing"] is want

    made = []
    real_data = sft.SFTData
    monkeypatch.setattr(sft, "SFTData", lambda *a, **k: made.append(k) or real_data(*a, **k))
    recs = [{"instruction": f"w{i}", "input": "", "output": "ab"} for i in range(8)]
    model = GPTModel(GPTConfig(vocab_size=129, context_length=16, n_embd=16, n_layer=1, n_head=2))
    kw = dict(max_new_tokens=2, sample=False, template=lambda r: r["instruction"])
    result = real_run(model, CharTokenizer(), recs[:6], recs[6:], recs[6:], train_args(tmp_path / "a", max_steps=1),
                      packing=True, max_length=12, **kw)
    real_run(model, CharTokenizer(), recs[:6], recs[6:], recs[6:], train_args(tmp_path / "b", max_steps=1), **kw)
    assert [k["pack_len"] for k in made] == [12, None]
    ckpt = torch.load(Path(result["checkpoint"]) / "state.pt", weights_only=False)
    assert ckpt["args"]["packing"] is True and ckpt["data"][0]["pack_len"] == 12
    # 6 examples of 4 input tokens ("w0ab" + eot, shifted) in rows of 12: three a row, none padding
    assert "sft: --packing: an epoch is 2 rows of 12 tokens (6 examples, 1 batch), 0.0% of the tokens padding " \
           "(unpacked, length-grouped: 6 rows in 2 batches, 0.0% padding)\n" in capsys.readouterr().err


def test_packing_line_says_when_packing_cannot_apply():
    examples = [Example(list(range(9)) + [128], 1) for _ in range(4)]  # 9 tokens: one a row of 16
    line = sft.packing_line(sft.SFTData(examples, [], 128, 2, pack_len=16), 16)
    assert line == ("sft: --packing: an epoch is 4 rows of 16 tokens (4 examples, 2 batches), 43.8% of the tokens "
                    "padding (unpacked, length-grouped: 4 rows in 2 batches, 0.0% padding); no two examples fit in "
                    "one row of 16 tokens: packing cannot apply, each example gets a row of its own; more padding "
                    "than without --packing")
    line = sft.packing_line(sft.SFTData(examples, [], 128, 2, pack_len=32), 32)
    assert "an epoch is 2 rows of 32 tokens" in line and "cannot apply" not in line
    # one example: nothing to pack with, which is not 'no two fit'; one row, one batch each way
    line = sft.packing_line(sft.SFTData(examples[:1], [], 128, 2, pack_len=16), 16)
    assert line == ("sft: --packing: an epoch is 1 row of 16 tokens (1 example, 1 batch), 43.8% of the tokens "
                    "padding (unpacked, length-grouped: 1 row in 1 batch, 0.0% padding); more padding than without "
                    "--packing")


def test_cli_sft_packing_trains_and_a_resume_names_the_flag(tmp_path, capsys):
    """A short `sft --packing` run end to end (with gradient accumulation): it trains, reports the
    packed epoch, evaluates unpacked, records --packing, and a resume without it is named."""
    from tritongpt.cli import main

    recs = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "up", "go", "on", "in",
                                                               "at", "by", "to", "we")]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "run"
    flags = ["sft", "--init", "tiny", "--tokenizer", "default", "--data", str(tmp_path / "a.jsonl"), "--out-dir",
             str(out), "--batch-size", "2", "--grad-accum", "2", "--eval-every", "1", "--eval-gen", "0",
             "--sample-every", "0", "--device", "cpu", "--kernels", "reference", "--max-length", "32",
             "--val-fraction", "0.2"]
    assert main(flags + ["--packing", "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "sft: --packing: an epoch is " in err and " rows of 32 tokens (" in err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any(math.isfinite(m.get("val_loss", math.nan)) for m in metrics)
    state = torch.load(out / "ckpt-0000002" / "state.pt", weights_only=False)
    assert state["args"]["packing"] is True and state["data"][0]["pack_len"] == 32
    assert main(flags + ["--max-steps", "3", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "--packing False (True)" in err, err
    assert "sft: --packing" not in err



def test_neftune_noise_is_uniform_within_its_bound_in_training_only(tmp_path, capsys, monkeypatch):
    """neftune_hook: the token embeddings [B, L, d] move by at most alpha / sqrt(L d), every element (the noise is
    as wide as the bound), in train mode only; run_sft trains with it (another first loss than without) and leaves
    the model without it; the CLI passes the flag on and refuses a negative or nan alpha."""
    from tritongpt.cli import main
    from tritongpt.train import sft

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=32, n_embd=48, n_layer=1, n_head=2))
    idx = torch.randint(0, 97, (3, 11))
    clean = model.tok_emb(idx)
    handle = model.tok_emb.register_forward_hook(sft.neftune_hook(5.0))
    bound = 5.0 / math.sqrt(11 * 48)
    diff = model.tok_emb(idx) - clean
    assert diff.abs().max() <= bound and diff.abs().max() > 0.9 * bound and (diff != 0).all()
    assert abs(diff.mean().item()) < bound / 10  # centred
    model.eval()
    assert torch.equal(model.tok_emb(idx), clean)
    handle.remove()
    seen = {}
    monkeypatch.setattr(sft, "run_sft", lambda *a, **k: seen.update(k) or {"is_main": False})
    flags = ["sft", "--init", "tiny", "--n-train", "4", "--n-eval", "2", "--tasks", "first_word", "--out-dir",
             str(tmp_path / "cli")]
    assert main([*flags, "--neftune-noise-alpha", "5"]) == 0 and seen["neftune_alpha"] == 5.0
    for bad in ("-1", "nan"):
        assert main([*flags, "--neftune-noise-alpha", bad]) == 2
        assert "--neftune-noise-alpha must be a finite number >= 0" in capsys.readouterr().err


def test_sft_with_neftune_trains_on_noisy_embeddings_and_returns_a_clean_model(tmp_path):
    from tritongpt.train import sft
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.tasks import generate_tasks
    from tritongpt.train.tokenizer import get_tokenizer

    tok = get_tokenizer("default")
    recs = generate_tasks(12, seed=3, families=["first_word"])
    losses = []
    for alpha in (0.0, 5.0):
        torch.manual_seed(1)
        model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=256, n_embd=32, n_layer=1, n_head=2))
        args = TrainArgs(out_dir=str(tmp_path / str(alpha)), max_steps=1, batch_size=4, eval_every=0, ckpt_every=0,
                         sample_every=0, log_every=1, device="cpu", kernels="reference", seed=0)
        result = sft.run_sft(model, tok, recs[:8], recs[8:], recs[8:], args, sample=False, neftune_alpha=alpha)
        losses.append(result["first_loss"])
        assert not model.tok_emb._forward_hooks  # the hook is gone with the run
    assert losses[0] != losses[1] and abs(losses[0] - losses[1]) < 0.5


def test_a_resume_names_a_neftune_alpha_set_or_dropped(tmp_path, capsys):
    """NEFTune's alpha is recorded with the run, 0 included: a resume that adds the noise, or drops it, is
    named (recorded only when set, a dropped alpha went unnamed)."""
    from tritongpt.train import sft
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.tasks import generate_tasks
    from tritongpt.train.tokenizer import get_tokenizer

    tok = get_tokenizer("default")
    recs = generate_tasks(8, seed=3, families=["first_word"])

    def run(alpha, steps, name, resume=None):
        torch.manual_seed(1)
        model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=256, n_embd=32, n_layer=1, n_head=2))
        args = TrainArgs(out_dir=str(tmp_path / name), max_steps=steps, batch_size=4, eval_every=0, ckpt_every=0,
                         sample_every=0, log_every=1, device="cpu", kernels="reference", seed=0, resume=resume)
        sft.run_sft(model, tok, recs[:6], recs[6:], recs[6:], args, sample=False, neftune_alpha=alpha)
        return capsys.readouterr().err

    run(5.0, 1, "noisy")
    # (the note's first flag is --max-steps: "the run had" goes with it)
    assert "--neftune-noise-alpha 0.0 (5.0)" in run(0.0, 2, "noisy", resume="latest")
    run(0.0, 1, "clean")
    err = run(5.0, 2, "clean", resume="latest")
    assert "--neftune-noise-alpha 5.0 (0.0)" in err and "did not record" not in err


def test_a_resume_at_every_default_names_no_unrecorded_flag(tmp_path, capsys):
    """A checkpoint older than sft's own flags (here --overlong and the data flags, dropped from its record: those
    were first recorded together) resumed with them at their defaults (what the older run did): nothing to name.
    Another value is named."""
    from tritongpt.train import common, sft
    from tritongpt.train.loop import TrainArgs
    from tritongpt.train.tasks import generate_tasks
    from tritongpt.train.tokenizer import get_tokenizer

    tok = get_tokenizer("default")
    recs = generate_tasks(8, seed=3, families=["first_word"])

    def run(steps, resume=None, **kw):
        torch.manual_seed(1)
        model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=256, n_embd=32, n_layer=1, n_head=2))
        args = TrainArgs(out_dir=str(tmp_path / "run"), max_steps=steps, batch_size=4, eval_every=0, ckpt_every=0,
                         sample_every=0, log_every=1, device="cpu", kernels="reference", seed=0, resume=resume)
        data = {"data": None, "tasks": sft.DEFAULT_TASKS, "n_train": sft.DEFAULT_N_TRAIN, "val_fraction": 0.1}
        sft.run_sft(model, tok, recs[:6], recs[6:], recs[6:], args, sample=False, run_args=data, **kw)
        return capsys.readouterr().err

    run(1)
    ck = common.Checkpointer(tmp_path / "run").latest()
    state = common.load_state(ck)
    for k in ("overlong", "tasks", "n_train", "val_fraction"):
        del state["args"][k]
    torch.save(state, ck / "state.pt")
    assert "did not record" not in run(2, resume="latest")
    state = common.load_state(common.Checkpointer(tmp_path / "run").latest())
    del state["args"]["overlong"]
    torch.save(state, common.Checkpointer(tmp_path / "run").latest() / "state.pt")
    assert "resuming with --overlong truncate, which" in run(3, resume="latest", overlong="truncate")
