"""`generate --prompts FILE --out FILE` (train/batch_generate.py): every prompt through the engine, each record's
text what `generate --prompt P --seed S + i` prints alone (greedy and seeded, stop strings, per-record settings),
in the file's order whatever --max-batch; the .txt form, --num-samples, the records' fields; every refusal named."""
import json
import re

import pytest
import torch

from parity import loud_attention
from tritongpt import cli
from tritongpt.commands import SAMPLE_SEPARATOR
from tritongpt.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 11
PROMPTS = ["The cat", "import os", "def f(x):", " return", "class A"]


@pytest.fixture(scope="module")
def saved(saved, tmp_path_factory):
    """conftest's model with loud attention and sharpened logits: the engine's rows read over the wrong keys or values
    (a row's fill, a page) would not draw generate()'s tokens alone, where the plain tiny model's tokens hardly read
    the cache."""
    from tritongpt.model.gpt import GPTModel

    path = tmp_path_factory.mktemp("loud") / "model.safetensors"
    model = loud_attention(GPTModel.load(saved))
    with torch.no_grad():  # sharpened: near-uniform over 4096 tokens, a sample hardly reads the logits at all
        model.final_norm.weight.mul_(8.0)
    model.save(path)
    return path


def run_prompts(saved, tmp_path, capsys, path, *flags):
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--weights", str(saved), "--prompts", str(path), "--out", str(out), "--seed",
                     str(SEED), "--max-new-tokens", "12", "--device", "cpu", *flags]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()], err


def alone(saved, capsys, prompt, seed, *flags) -> list:
    """`generate --prompt` alone: its sample texts after the prompt."""
    assert cli.main(["generate", "--weights", str(saved), "--prompt", prompt, "--seed", str(seed),
                     "--max-new-tokens", "12", "--device", "cpu", *flags]) == 0
    texts = capsys.readouterr().out[:-1].split("\n" + SAMPLE_SEPARATOR + "\n")
    assert all(t.startswith(prompt) for t in texts), texts
    return [t[len(prompt):] for t in texts]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_each_record_is_generate_alone_in_order_whatever_the_batch(saved, tmp_path, capsys, monkeypatch):
    """Sampled (--seed S: record i seeded S + i, a record's own seed winning), greedy, per-record max_tokens and
    stop over --stop: the texts, finish reasons and counts; --max-batch 1 and 3 (records waiting for rows), a
    paged cache (records preempted for pages) and chunked prefill (--max-prefill-tokens 2, passed to the engine) the
    same file's same texts in its order."""
    from tritongpt.train.engine import Engine

    chunks, engines, init = [], [], Engine.__init__
    monkeypatch.setattr(Engine, "__init__", lambda self, *a, **kw: chunks.append(kw.get("max_prefill_tokens"))
                        or engines.append(self) or init(self, *a, **kw))
    plain, _ = run_prompts(saved, tmp_path, capsys, write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS]))
    texts = [r["text"] for r in plain]
    stop0, stop1 = texts[0][2:4], texts[1][3:5]  # (texts of a random model: stops that do occur in them)
    records = [{"prompt": PROMPTS[0]},
               {"prompt": PROMPTS[1], "stop": [stop1]},
               {"prompt": PROMPTS[2], "temperature": 0, "max_tokens": 5},
               {"prompt": PROMPTS[3], "seed": 99, "top_k": 5, "top_p": 0.9},
               {"prompt": PROMPTS[0], "seed": SEED, "max_tokens": 7, "stop": []}]  # record 0's seed, no stop
    path = write_jsonl(tmp_path / "r.jsonl", records)
    want = [alone(saved, capsys, PROMPTS[0], SEED, "--stop", stop0),
            alone(saved, capsys, PROMPTS[1], SEED + 1, "--stop", stop1),
            alone(saved, capsys, PROMPTS[2], SEED + 2, "--stop", stop0, "--temperature", "0", "--max-new-tokens", "5"),
            alone(saved, capsys, PROMPTS[3], 99, "--stop", stop0, "--top-k", "5", "--top-p", "0.9"),
            alone(saved, capsys, PROMPTS[0], SEED, "--max-new-tokens", "7")]
    # (a paged cache of 4 pages of 4 positions: 3 records admitted on their prompts' pages, then short of pages as
    # they grow: preempted, waiting and recomputed)
    # and prefix caching (record 4 repeats record 0's prompt of 3 tokens: its first page of 2 read from the cache)
    for batch in (["1"], ["3"], ["3", "--kv-cache-pages", "4", "--kv-page-size", "4"],
                  ["3", "--kv-cache-pages", "16", "--kv-page-size", "2", "--enable-prefix-caching"],
                  ["3", "--max-prefill-tokens", "2"]):
        got, err = run_prompts(saved, tmp_path, capsys, path, "--stop", stop0, "--max-batch", *batch)
        assert chunks.pop() == (2 if "--max-prefill-tokens" in batch else None)
        assert (engines.pop().stats["preemptions"] > 0) == (batch[1:3] == ["--kv-cache-pages", "4"])
        assert [r["index"] for r in got] == list(range(5)) and [r["prompt"] for r in got] == [*PROMPTS[:4], PROMPTS[0]]
        assert [[r["text"]] for r in got] == want, batch
        assert "5 prompts (5 samples)" in err and "generated tokens/s" in err
        assert ("prefix caching: 2 of 15 prompt tokens read from the cache" in err) == \
            ("--enable-prefix-caching" in batch), err
        for i, stop in ((0, stop0), (1, stop1)):  # cut at the flag's stop, at the record's own
            assert got[i]["finish_reason"] == "stop" and got[i]["completion_tokens"] < 12, got[i]
            assert got[i]["text"] == texts[i][:texts[i].index(stop)]
        assert (got[2]["finish_reason"], got[2]["completion_tokens"]) == ("length", 5)
        # "stop": [] over --stop: record 0's text, uncut
        assert stop0 in got[4]["text"] and (got[4]["finish_reason"], got[4]["completion_tokens"]) == ("length", 7)
        assert all(r["prompt_tokens"] == plain[i % 4]["prompt_tokens"] > 0 for i, r in enumerate(got))
        assert set(got[0]) == {"index", "sample", "prompt", "text", "finish_reason", "prompt_tokens",
                               "completion_tokens"}


def test_a_txt_file_and_num_samples(saved, tmp_path, capsys):
    """A .txt of one prompt a line (blank lines skipped, spaces kept): --num-samples 2 gives two records a prompt,
    `generate --num-samples 2 --seed S + i`'s two texts."""
    path = tmp_path / "p.txt"
    path.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[3]}\r\n", encoding="utf-8")
    got, err = run_prompts(saved, tmp_path, capsys, path, "--num-samples", "2", "--max-batch", "3")
    assert [(r["index"], r["sample"], r["prompt"]) for r in got] == \
        [(0, 0, PROMPTS[0]), (0, 1, PROMPTS[0]), (1, 0, PROMPTS[3]), (1, 1, PROMPTS[3])]
    assert [r["text"] for r in got[:2]] == alone(saved, capsys, PROMPTS[0], SEED, "--num-samples", "2")
    assert [r["text"] for r in got[2:]] == alone(saved, capsys, PROMPTS[3], SEED + 1, "--num-samples", "2")
    assert "2 prompts (4 samples)" in err


def test_generate_batch_keeps_the_input_order_and_calls_on_done_in_it(saved):
    """The Python function: prompts of different lengths and budgets (the short ones end first), results and
    on_done in the input order, each generate()'s alone with its generator seeded seed + i."""
    from tritongpt.train.batch_generate import generate_batch
    from tritongpt.train.generate import generate
    from tritongpt.train.gpt2_weights import load_checkpoint

    model = load_checkpoint(saved).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14]]
    done = []
    outs = generate_batch(model, prompts, [9, 2, 5], max_batch=2, seed=3, temperature=0.9,
                          on_done=lambda i, ids: done.append(i))
    assert done == [0, 1, 2]
    for i, (p, new) in enumerate(zip(prompts, [9, 2, 5])):
        want = generate(model, torch.tensor([p]), new, temperature=0.9, generator=torch.Generator().manual_seed(3 + i))
        assert torch.equal(outs[i], want), i
    with pytest.raises(UserError, match="3 prompts but 2 max_new_tokens"):
        generate_batch(model, prompts, [1, 2])


def test_every_engine_flag_without_prompts_is_refused_by_name(saved, capsys):
    """Each flag add_engine_args gives generate (serve's engine settings) works only with --prompts FILE: without
    it, a one-prompt run would ignore it silently (--enable-prefix-caching once was). Read from the parser, so a
    flag added there later is checked too."""
    import argparse

    from tritongpt.train.serve import add_engine_args, add_lora_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser, None, "")
    add_lora_args(parser)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 5
    base = ["generate", "--weights", str(saved), "--device", "cpu", "--max-new-tokens", "2", "--prompt", "x"]
    for action in flags:
        flag = action.option_strings[0]
        given = [flag] if action.nargs == 0 else [flag, "4"]
        assert cli.main([*base, *given]) == 2, flag
        assert f"{flag} is a --prompts FILE setting" in capsys.readouterr().err, flag


def test_every_refusal_is_named(saved, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "The cat"}])
    base = ["generate", "--weights", str(saved), "--device", "cpu", "--max-new-tokens", "4"]
    batch = [*base, "--prompts", str(good), "--out", str(tmp_path / "o.jsonl")]
    for flags, said in [
            ([*batch, "--stream"], "--prompts does not take --stream"),
            ([*batch, "--draft", str(saved), "--prompt-lookup", "2"], "--draft and --prompt-lookup are two drafts"),
            ([*batch, "--draft-tokens", "3"], "with --prompt-lookup or --draft, got 3 without either"),
            ([*batch, "--prompt-lookup", "0"], "--prompt-lookup (the longest n-gram looked up) must be a positive"),
            ([*batch, "--num-beams", "2"], "--prompts does not take --num-beams"),
            ([*batch, "--num-samples", "3", "--max-batch", "2"], "--num-samples 3 takes 3 rows"),
            ([*batch, "--max-batch", "0"], "--max-batch must be a positive integer"),
            ([*batch, "--kv-page-size", "8"], "--kv-page-size sizes the pages of --kv-cache-pages"),
            ([*batch, "--max-prefill-tokens", "0"], "--max-prefill-tokens must be a positive number of tokens"),
            ([*base, "--prompt", "x", "--max-prefill-tokens", "4"], "--max-prefill-tokens is a --prompts FILE setting"),
            ([*base, "--prompts", str(good)], "pass --out FILE"),
            ([*base, "--prompts", str(good), "--out", str(tmp_path)], "is a folder: name the .jsonl file"),
            ([*base, "--prompts", str(good), "--out", str(tmp_path / "no" / "o.jsonl")], "does not exist"),
            ([*base, "--prompts", str(good), "--out", str(good)], "is the --prompts file"),  # was replaced
            ([*batch, "--kv-cache-pages", "1", "--kv-page-size", "4"], "more than the cache's 1"),  # (pages passed on)
            ([*base, "--prompt", "x", "--out", "o.jsonl"], "--out is a --prompts FILE setting"),
            ([*base, "--prompt", "x", "--max-batch", "4"], "--max-batch is a --prompts FILE setting"),
            ([*base, "--prompts", str(tmp_path / "p.csv"), "--out", "o.jsonl"], "expected a .jsonl file"),
            ([*batch, "--max-new-tokens", "40"], "good.jsonl: record 0 (line 1): the prompt's 3 tokens + max tokens "
                                                 "40 > the model's context 32")]:
        assert cli.main(flags) == 2, flags
        assert said in capsys.readouterr().err, (flags, said)
    for record, said in [({"prompt": "x", "n": 2}, "record 1 (line 2): unknown field 'n'"),
                         ({"text": "x"}, "record 1 (line 2): missing field 'prompt'"),
                         ({"prompt": "x", "max_tokens": 1.5}, "'max_tokens' must be an integer >= 0"),
                         ({"prompt": "x", "temperature": -1}, "record 1 (line 2): temperature must be"),
                         ({"prompt": "x", "top_p": 0}, "record 1 (line 2): top_p must be in (0, 1]"),
                         ({"prompt": "x", "seed": 2**64}, "'seed' must be a 64-bit integer"),
                         ({"prompt": "x", "stop": [""]}, "'stop' must be a non-empty string"),
                         (["x"], "record 1 (line 2): expected a JSON object")]:
        path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, record])
        assert cli.main([*base, "--prompts", str(path), "--out", str(tmp_path / "o.jsonl")]) == 2, record
        assert said in capsys.readouterr().err, (record, said)
    with pytest.raises(SystemExit):  # argparse: one prompt source
        cli.main([*batch, "--prompt", "x"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_prompt_the_engine_refuses_names_its_record_and_leaves_out_as_it_was(saved, tmp_path, capsys,
                                                                              monkeypatch):
    """Record 1's 10 tokens + 8 need 5 pages of 4, the cache has 3: refused at its submission, before any result, so
    an --out of an earlier run is not emptied, and the message names the record."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "The cat sat on the mat and then"}])
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier run's results\n", encoding="utf-8")
    assert cli.main(["generate", "--weights", str(saved), "--device", "cpu", "--prompts", str(path), "--out", str(out),
                     "--max-new-tokens", "8", "--kv-cache-pages", "3", "--kv-page-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "p.jsonl: record 1 (line 2): the request needs 5 KV pages" in err, err
    assert out.read_text(encoding="utf-8") == "an earlier run's results\n"
    # an engine error midway (its 6th token: record 0's 4 written, record 1's second): the error raised, and the
    # half-written --out said to be so
    from tritongpt.train import engine

    calls = []

    def failing(step):  # (a request's step's token: decode_step's, take_step's, or append_taken's after the
        # batched draw's post-draw work)
        def fn(*a, **kw):
            calls.append(1)
            if len(calls) == 6:
                raise RuntimeError("a broken step")
            return step(*a, **kw)
        return fn
    monkeypatch.setattr(engine, "decode_step", failing(engine.decode_step))
    monkeypatch.setattr(engine, "take_step", failing(engine.take_step))
    monkeypatch.setattr(engine, "append_taken", failing(engine.append_taken))
    with pytest.raises(RuntimeError, match="a broken step"):
        cli.main(["generate", "--weights", str(saved), "--device", "cpu", "--prompts", str(path), "--out", str(out),
                  "--max-new-tokens", "4", "--max-batch", "1"])
    assert f"--out {out} holds the results of the first 1 of 2 prompts only" in capsys.readouterr().err
    assert [json.loads(line)["index"] for line in out.read_text(encoding="utf-8").splitlines()] == [0]


def test_prompt_lookup_gives_each_record_generates_prompt_lookup_text(saved, tmp_path, capsys):
    """--prompt-lookup N --draft-tokens K: each record's text is `generate --prompt-lookup N --draft-tokens K`'s
    alone (sampled with its seed, and greedy), the acceptance said at the end."""
    records = [{"prompt": "The cat The cat The"}, {"prompt": "import os import os", "temperature": 0}]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    lookup = ["--prompt-lookup", "2", "--draft-tokens", "3"]
    got, err = run_prompts(saved, tmp_path, capsys, path, "--max-batch", "2", *lookup)
    want = [alone(saved, capsys, records[0]["prompt"], SEED, *lookup),
            alone(saved, capsys, records[1]["prompt"], SEED + 1, "--temperature", "0", *lookup)]
    assert [[r["text"]] for r in got] == want
    assert "prompt lookup: " in err and " accepted" in err


def test_a_draft_gives_each_record_generates_draft_text(saved, tmp_path, capsys):
    """--draft PATH --draft-tokens K (the model as its own draft): each record's text is `generate --draft PATH
    --draft-tokens K`'s alone (sampled with its seed, and greedy), every proposal accepted, said at the end."""
    records = [{"prompt": "The cat The cat The"}, {"prompt": "import os import os", "temperature": 0}]
    path = write_jsonl(tmp_path / "r.jsonl", records)
    spec = ["--draft", str(saved), "--draft-tokens", "3"]
    got, err = run_prompts(saved, tmp_path, capsys, path, "--max-batch", "2", *spec)
    want = [alone(saved, capsys, records[0]["prompt"], SEED, *spec),
            alone(saved, capsys, records[1]["prompt"], SEED + 1, "--temperature", "0", *spec)]
    assert [[r["text"]] for r in got] == want
    assert re.search(r"draft model: \d+ drafts of (\d+) tokens, \1 accepted \(100%\)", err), err


def test_records_naming_an_adapter_run_it_beside_the_others(saved, tmp_path, capsys):
    """--enable-lora --lora-modules: a record whose "model" names an adapter gets the greedy text of `generate
    --prompt` on the model with that adapter merged (W + B A), the others the base's, all in one engine; the output
    records name the adapter. An unknown name is refused with its record."""
    import copy

    from test_lora import with_trained_lora
    from tritongpt.model.gpt import GPTModel
    from tritongpt.model.lora import merge_lora

    lora = with_trained_lora(GPTModel.load(saved), rank=4, alpha=8.0, seed=3)
    for p in lora.parameters():  # (B large enough to change the greedy text)
        p.data.mul_(6.0) if p.shape[-1] == 4 else None
    (tmp_path / "ckpt").mkdir()
    lora.save(tmp_path / "ckpt" / "model.safetensors")
    merge_lora(copy.deepcopy(lora)).save(tmp_path / "merged.safetensors")
    records = [{"prompt": "The cat", "model": "tuned"}, {"prompt": "The cat"}, {"prompt": "import os", "model": "tuned"}]
    out, _ = run_prompts(saved, tmp_path, capsys, write_jsonl(tmp_path / "p.jsonl", records), "--temperature", "0",
                         "--enable-lora", "--lora-modules", f"tuned={tmp_path / 'ckpt'}", "--max-batch", "3")
    assert [r.get("model") for r in out] == ["tuned", None, "tuned"]
    for rec, got in zip(records, out):
        weights = tmp_path / "merged.safetensors" if "model" in rec else saved
        assert got["text"] == alone(weights, capsys, rec["prompt"], SEED, "--temperature", "0")[0], rec
    assert out[0]["text"] != out[1]["text"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "model": "other"}])
    assert cli.main(["generate", "--weights", str(saved), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"),
                     "--device", "cpu", "--enable-lora", "--lora-modules", f"tuned={tmp_path / 'ckpt'}"]) == 2
    assert "record 0 (line 1): 'model' 'other' is no adapter of this run (--lora-modules names 'tuned')" in \
        capsys.readouterr().err
