"""`tritongpt lambada`: the scores against a plain loop (a text at a time, the whole model forward, no
batching or padding), a model that has learnt the texts, the file's checks, the download and the command."""
import json
import math
from pathlib import Path

import pytest
import torch
from parity import scoring_run

from tritongpt.cli import main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train import lambada
from tritongpt.train.data import load_text
from tritongpt.train.tokenizer import BPETokenizer

import test_hub_datasets
from test_hub_datasets import write_parquet

hub = test_hub_datasets.hub  # the faked Hub, a fixture requested by name

# the last words include long ones, several tokens each in a 300-token vocabulary
WORDS = ("the cat sat on a mat while dogs ran far away from home and then came back to eat some bread "
         "with jam under a tree near the river bank").split()
LAST = ("home", "tree", "riverbank", "marmalade", "breadcrumbs", "a", "jam.", "cat,", "understanding")


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(load_text("pydoc")[:20000], 300, name="small")


def random_texts(n, seed, lo=3, hi=30):
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)]
        texts.append(" ".join(words + [LAST[int(torch.randint(len(LAST), (1,), generator=g))]]))
    return texts


def plain_loop(model, tok, texts):
    """Each text alone, as lm-eval's lambada_openai reads it: the words but the last as the context, " " + the
    last as the target; the float64 model's forward on the row (its last context + 1 tokens); the target's
    log-likelihood summed, and whether each of its tokens is the argmax. -> (acc, perplexity, per text)."""
    model64 = GPTModel(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    per = []
    for text in texts:
        words = text.split(" ")
        ctx, target = tok.encode(" ".join(words[:-1])), tok.encode(" " + words[-1])
        row = torch.tensor((ctx + target)[-(model.config.context_length + 1):])
        with torch.no_grad():
            logits = model64(row[None, :-1])[0]
        at = torch.arange(len(row) - len(target) - 1, len(row) - 1)  # the positions that predict the target
        logp = torch.log_softmax(logits, dim=-1)[at, torch.tensor(target)]
        per.append((bool((logits[at].argmax(-1) == torch.tensor(target)).all()), float(logp.sum())))
    acc = sum(g for g, _ in per) / len(per)
    return acc, math.exp(-sum(ll for _, ll in per) / len(per)), per


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_scores_match_a_plain_loop_over_the_texts(tok):
    torch.manual_seed(3)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=24, n_embd=32, n_layer=2, n_head=2,
                               dropout=0.5))  # scored without dropout, as the float64 model in eval mode
    texts = random_texts(20, seed=4)
    examples = [{"ctx": t.rsplit(" ", 1)[0], "target": " " + t.rsplit(" ", 1)[1]} for t in texts]
    lengths = [(len(tok.encode(ex["ctx"])), len(tok.encode(ex["target"]))) for ex in examples]
    assert max(c + t for c, t in lengths) > 25 and min(c + t for c, t in lengths) < 25  # some cut, some not
    assert max(t for _, t in lengths) >= 3  # multi-token last words
    acc, ppl, per = plain_loop(model, tok, texts)
    for batch_size in (1, 3, 20):
        got = lambada.score(model, tok, examples, batch_size=batch_size)
        assert got["examples"] == 20 and got["acc"] == acc and got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    for ex, (greedy, ll) in zip(examples, per):  # each text's own figures: a right sum can't hide wrong parts
        one = lambada.score(model, tok, [ex])
        assert one["acc"] == greedy and one["perplexity"] == pytest.approx(math.exp(-ll), rel=1e-5)
    assert model.training


def test_a_target_past_the_context_is_refused_and_a_huge_perplexity_is_inf(tok):
    """The target is scored whole or not at all (a last word of more tokens than the model's context was scored on
    its tail, silently), and a perplexity past float's range is inf, not an OverflowError's traceback."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=8, n_embd=32, n_layer=1, n_head=2))
    long_word = "understanding" * 3
    assert len(tok.encode(" " + long_word)) > 8
    with pytest.raises(UserError, match="longer than the model's context \\(8\\): it cannot be scored whole"):
        lambada.score(model, tok, [{"ctx": "the cat", "target": " " + long_word}])
    with torch.no_grad():
        model.tok_emb.weight.mul_(1e4)  # the tied head's logits far apart: a loss of thousands of nats a token
    got = lambada.score(model, tok, [{"ctx": "the cat sat on", "target": " home"}])
    assert got["acc"] == 0.0 and got["perplexity"] == math.inf


def test_a_model_that_learnt_the_texts_gets_them_right(tok, tmp_path):
    """A model trained on a repeated passage predicts its words: texts cut from it score acc 1 where the last
    word is the passage's next word, 0 where it is swapped for another; as the plain loop says."""
    passage = "the cat sat on the mat while the dogs ran far away from home and then came back to eat jam"
    ids = torch.tensor(tok.encode((" " + passage) * 6))
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_embd=64, n_layer=2, n_head=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    starts = torch.arange(0, len(ids) - 33)
    for _ in range(120):
        batch = torch.stack([ids[s:s + 33] for s in starts[torch.randint(len(starts), (16,))]])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    words = ((passage + " ") * 3).split()
    texts = [" ".join(words[i:i + 12]) for i in range(0, 20)]
    texts += [" ".join(words[i:i + 11] + ["riverbank"]) for i in range(0, 6)]
    acc, ppl, _ = plain_loop(model, tok, texts)
    examples = lambada.read_texts(write_jsonl(tmp_path / "l.jsonl", [{"text": t} for t in texts]))
    got = lambada.score(model, tok, examples, batch_size=7)
    assert got["acc"] == acc and got["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert 0.6 < acc < 1  # most learnt, the swapped words not


def test_a_file_of_texts_is_read_and_a_bad_one_named(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "It was a dark and stormy night", "id": 3},
                                              {"text": "she said  hello  world"}])
    assert lambada.read_texts(path) == [{"ctx": "It was a dark and stormy", "target": " night"},
                                        {"ctx": "she said  hello ", "target": " world"}]
    (tmp_path / "l.json").write_text(json.dumps([{"text": "a b c"}]))
    assert lambada.read_texts(tmp_path / "l.json") == [{"ctx": "a b", "target": " c"}]
    good = {"text": "a b c"}
    for row, said in (("[1]", "expected a JSON object with a 'text' field, got list"),
                      ({"ctx": "x", "endings": ["a", "b"], "label": 0},
                       r"no 'text' field \(fields \['ctx', 'endings', 'label'\]\)"),
                      ({"text": ""}, "'text' must be the passage, got ''"),
                      ({"text": " \n"}, "'text' must be the passage"),
                      ({"text": 3}, "'text' must be the passage, got 3"),
                      ({"text": None}, "'text' must be the passage, got None"),
                      ({"text": "oneword"}, "'text' has no space, so no last word to predict: 'oneword'"),
                      ({"text": "two words "}, "'text' ends with a space, so no last word"),
                      ({"text": " word"}, "'text' has nothing before its last word")):
        path.write_text(json.dumps(good) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
        with pytest.raises(UserError, match=r"l.jsonl: record 1 \(line 2\): " + said):
            lambada.read_texts(path)
    with pytest.raises(UserError, match="LAMBADA file not found: .*none.jsonl"):
        lambada.read_texts(tmp_path / "none.jsonl")
    path.write_text("\n")
    with pytest.raises(UserError, match="l.jsonl: no records"):
        lambada.read_texts(path)


def test_a_parquet_file_as_the_hub_has_it(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"text": "the cat sat on the mat", "domain": None}, {"text": "far away from home", "domain": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    assert lambada.read_texts(tmp_path / "test-00000-of-00001.parquet") == lambada.read_texts(
        write_jsonl(tmp_path / "l.jsonl", rows)) == [{"ctx": "the cat sat on the", "target": " mat"},
                                                     {"ctx": "far away from", "target": " home"}]
    pq.write_table(pa.Table.from_pylist([{"text": "nospace"}]), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet: record 0: 'text' has no space"):
        lambada.read_texts(tmp_path / "bad.parquet")


def test_the_test_split_is_downloaded_once(tmp_path, monkeypatch):
    import urllib.request

    fetched = []

    def fetch(url, to):
        fetched.append(url)
        write_jsonl(to, [{"text": "a b c"}])

    monkeypatch.setattr(urllib.request, "urlretrieve", fetch)
    path = lambada.download(tmp_path)
    assert path == tmp_path / "lambada" / "lambada_test.jsonl" and lambada.download(tmp_path) == path
    assert fetched == [lambada.URL] and lambada.read_texts(path) == [{"ctx": "a b", "target": " c"}]

    def offline(url, to):
        open(to, "w").write("half a fi")
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(UserError, match="could not download LAMBADA from .*lambada_test.jsonl .* no network; pass "
                                        "--data with the lambada_test.jsonl file"):
        lambada.download(tmp_path / "other")
    assert not any((tmp_path / "other" / "lambada").iterdir())


def test_the_command_scores_a_run(tok, tmp_path, capsys, monkeypatch):
    run, model = scoring_run(tmp_path, tok, 5, 24)
    texts = random_texts(9, seed=6)
    data = write_jsonl(tmp_path / "lambada.jsonl", [{"text": t} for t in texts])
    base = ["lambada", "--weights", str(run), "--data", str(data), "--device", "cpu"]
    assert main(base + ["--json", "--limit", "7", "--batch-size", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    acc, ppl, _ = plain_loop(model, tok, texts[:7])
    assert (got["examples"], got["acc"], got["tokenizer"]) == (7, acc, "small")
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert (got["weights"], got["data"], got["kernels"]) == (str(run), str(data), ["reference"])
    assert main(base) == 0
    out = capsys.readouterr().out
    want = lambada.score(model, tok, lambada.read_texts(data))
    assert out.startswith(f"lambada: 9 examples: acc {want['acc']:.4f}, perplexity {want['perplexity']:.2f} (")
    # --quantize int8 (as hellaswag's, load_scorer): the int8 model's figures, recorded as such
    import copy

    from tritongpt.model.quant import quantize_int8

    assert main(base + ["--json", "--limit", "7", "--quantize", "int8"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = lambada.score(quantize_int8(copy.deepcopy(model)), tok, lambada.read_texts(data)[:7])
    assert got["quantize"] == "int8" and got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["perplexity"] != pytest.approx(ppl, rel=1e-7)  # not the float model's
    # no --data: OpenAI's file, downloaded into --cache-dir
    import shutil
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, to: shutil.copy(data, to))
    assert main(base[:3] + ["--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["examples"], got["data"], got["acc"]) == (9, lambada.URL, want["acc"])
    assert (tmp_path / "cache" / "lambada" / "lambada_test.jsonl").read_text() == data.read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a b"}, {"text": "ab"}])
    for flags, said in ((["--limit", "0"], "--limit must be at least 1, got 0"),
                        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                        (["--data", str(tmp_path / "none.jsonl")], "LAMBADA --data file not found: "),
                        (["--data", str(bad)], r"bad.jsonl: record 1 (line 2): 'text' has no space"),
                        (["--tokenizer", "default"], "tokenizer default has 4096 tokens but the model only 300")):
        assert main(base + flags) == 2
        assert said in capsys.readouterr().err
    # a perplexity past float's range: --json writes null (strict JSON), not Python's bare Infinity
    monkeypatch.setattr(lambada, "score", lambda *a, **k: {"examples": 7, "acc": 0.0, "perplexity": math.inf})
    assert main(base + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(f"not JSON: {name}"))
    assert (got["examples"], got["perplexity"]) == (7, None)


def test_a_hub_dataset_id_reads_its_test_split(hub, tok, capsys):
    """--data owner/name/config: the config's test split (LAMBADA has no train split), as the Hub's
    EleutherAI/lambada_openai is laid out (a config a folder); fetched with the faked Hub of test_hub_datasets."""
    hub_dir, _, fetched = hub
    texts = random_texts(5, seed=9)
    write_parquet(hub_dir / "owner/lambada/default/test-00000-of-00001.parquet", [{"text": t} for t in texts])
    write_parquet(hub_dir / "owner/lambada/de/test-00000-of-00001.parquet", [{"text": "ein zwei"}])
    torch.manual_seed(5)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=24, n_embd=32, n_layer=2, n_head=2))
    Path("run").mkdir()
    model.save(Path("run") / "model.safetensors")
    tok.save(Path("run") / "tokenizer.json")
    assert main(["lambada", "--weights", "run", "--data", "owner/lambada/default", "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    acc, ppl, _ = plain_loop(model, tok, texts)
    assert (got["examples"], got["acc"]) == (5, acc) and got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert fetched == [("owner/lambada", "default/test-00000-of-00001.parquet")]
    assert main(["lambada", "--weights", "run", "--data", "owner/lambada", "--device", "cpu"]) == 2
    assert "has several configs (de, default): name one" in capsys.readouterr().err
