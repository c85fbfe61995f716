"""`tritongpt hellaswag`: the rows an example becomes, the scores against a direct float64
computation, the file's checks, the download, and the command line."""
import json

import pytest
import torch
from parity import scoring_run

from tritongpt.cli import main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train import hellaswag
from tritongpt.train.data import load_text
from tritongpt.train.tokenizer import BPETokenizer

WORDS = ("the cat sat on a mat while dogs ran far away from home and then came back to eat some "
         "bread with jam under a tree near the river bank").split()


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(load_text("pydoc")[:20000], 300, name="small")


def random_examples(n, seed):
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g))

    return [{"ctx": text(3, 12), "endings": [text(1, 9) for _ in range(4)],
             "label": int(torch.randint(4, (1,), generator=g))} for _ in range(n)]


def test_an_example_is_its_endings_after_the_context_with_only_their_tokens_counted(tok):
    ex = {"ctx": "The cat sat", "endings": ["on the mat.", "away", "under a tree near the river"], "label": 0}
    ctx = tok.encode("The cat sat")
    inputs, targets = hellaswag.render(ex, tok, context=64)
    width = max(len(ctx) + len(tok.encode(" " + e)) for e in ex["endings"]) - 1
    assert inputs.shape == targets.shape == (3, width)
    for i, ending in enumerate(ex["endings"]):
        end = tok.encode(" " + ending)
        row = ctx + end
        assert inputs[i, :len(row) - 1].tolist() == row[:-1]
        counted = targets[i][targets[i] != -100].tolist()
        assert counted == end and targets[i, len(ctx) - 2] == -100  # the ending's tokens, in order
        assert targets[i, :len(ctx) - 1].eq(-100).all() and targets[i, len(row) - 1:].eq(-100).all()
    # a row past the context keeps its last tokens: the ending whole, the context's tail
    inputs, targets = hellaswag.render(ex, tok, context=6)
    end = tok.encode(" under a tree near the river")
    row = (ctx + end)[-7:]
    assert inputs[2].tolist() == row[:-1] and targets[2][targets[2] != -100].tolist() == end[-6:]


def test_scores_match_each_ending_scored_alone_in_float64(tok):
    """Each ending's loss, and acc and acc_norm, as a direct computation gives them: each ending run
    alone after its context through the float64 model, -log p of its tokens summed (acc) and
    averaged (acc_norm); in batches of any size (rows right-padded to the longest)."""
    torch.manual_seed(3)
    # with dropout, and in training mode: scored without it (eval mode), as the float64 model below
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=24, n_embd=32, n_layer=2, n_head=2,
                               dropout=0.5))
    examples = random_examples(30, seed=4)
    right = right_norm = 0
    want = []
    model64 = GPTModel(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    for ex in examples:
        sums, means = [], []
        for ending in ex["endings"]:
            ctx, end = tok.encode(ex["ctx"]), tok.encode(" " + ending)
            row = torch.tensor((ctx + end)[-25:])
            with torch.no_grad():
                logp = torch.log_softmax(model64(row[None, :-1]), dim=-1)[0]
            nll = -logp[torch.arange(len(row) - 1), row[1:]][-len(end):]
            sums.append(float(nll.sum()))
            means.append(float(nll.mean()))
        want.append(torch.tensor([sums, means], dtype=torch.float64))
        right += min(range(4), key=sums.__getitem__) == ex["label"]
        right_norm += min(range(4), key=means.__getitem__) == ex["label"]
    for batch_size in (1, 7, 8, 30):  # examples per forward, right-padded to the longest row
        got = torch.stack([torch.stack(pair) for pair in hellaswag.ending_losses(model, tok, examples, batch_size)])
        ref = torch.stack(want)
        assert float((got - ref).norm() / ref.norm()) < 1e-5 and float((got - ref).abs().max()) < 1e-4, batch_size
        got = hellaswag.score(model, tok, examples, batch_size=batch_size)
        assert got["examples"] == 30
        assert (got["acc"], got["acc_norm"]) == (right / 30, right_norm / 30), batch_size
    assert right != right_norm  # the two figures differ here: neither can stand in for the other
    assert model.training  # left in the mode it was in


def test_a_file_that_is_not_hellaswag_is_named(tmp_path):
    path = tmp_path / "h.jsonl"
    good = {"ctx": "A man", "endings": ["runs.", "sits."], "label": 1, "activity_label": "x"}
    path.write_text(json.dumps(good) + "\n\n")
    assert hellaswag.read_examples(path) == [{"ctx": "A man", "endings": ["runs.", "sits."], "label": 1}]
    path.write_text(json.dumps(dict(good, label="1")) + "\n")  # Hugging Face's Rowan/hellaswag writes strings
    assert hellaswag.read_examples(path)[0]["label"] == 1
    for row, said in (("{", r"h.jsonl: record 1 \(line 2\) is not valid JSON"),
                      ("[1]", "expected a JSON object, got list"),
                      (dict(good, ctx=""), "'ctx' must be the context text"),
                      (dict(good, ctx=" \n"), "'ctx' must be the context text"),
                      (dict(good, endings=["only one"]), "'endings' must be a list of at least 2 texts"),
                      (dict(good, endings=["a", 3]), "'endings' must be a list of at least 2 texts"),
                      (dict(good, endings=["a", " "]), "'endings' must be a list of at least 2 texts"),
                      (dict(good, label=2), r"'label' must be the index of the right ending \(0..1\), got 2"),
                      (dict(good, label=-1), r"'label' must be the index of the right ending \(0..1\), got -1"),
                      (dict(good, label=True), "'label' must be the index"),
                      (dict(good, label=""), "'label' must be the index"),  # HF's test split: no answer
                      (dict(good, label="one"), "'label' must be the index")):
        path.write_text(json.dumps(good) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
        with pytest.raises(UserError, match=said if row == "{" else r"h.jsonl: record 1 \(line 2\): " + said):
            hellaswag.read_examples(path)
    path.write_text("\n")
    with pytest.raises(UserError, match="h.jsonl: no records"):
        hellaswag.read_examples(path)
    path.write_bytes(b"\xff\n")
    with pytest.raises(UserError, match="h.jsonl: not UTF-8 text"):
        hellaswag.read_examples(path)
    with pytest.raises(UserError, match="HellaSwag file not found"):
        hellaswag.read_examples(tmp_path / "none.jsonl")


@pytest.mark.parametrize("command, flag", [("hellaswag", "--limit"), ("hellaswag", "--max-examples"),
                                           ("lambada", "--max-examples"), ("lambada", "--limit")])
def test_a_bad_count_is_refused_by_the_flag_typed(command, flag, tmp_path, capsys):
    """--max-examples and --limit are one count's two names: a bad one is named as typed (--limit 0 was refused as
    --max-examples'), before any work (the weights are not read)."""
    assert main([command, "--weights", str(tmp_path / "none"), flag, "0"]) == 2
    assert f"error: {flag} must be at least 1, got 0" in capsys.readouterr().err


def test_the_validation_split_is_downloaded_once(tmp_path, monkeypatch):
    import urllib.request

    fetched = []

    def fetch(url, to):
        fetched.append(url)
        with open(to, "w") as f:
            f.write(json.dumps({"ctx": "A", "endings": ["b", "c"], "label": 0}) + "\n")

    monkeypatch.setattr(urllib.request, "urlretrieve", fetch)
    path = hellaswag.download(tmp_path)
    assert path == tmp_path / "hellaswag" / "hellaswag_val.jsonl" and hellaswag.download(tmp_path) == path
    assert fetched == [hellaswag.URL] and len(hellaswag.read_examples(path)) == 1

    def offline(url, to):
        open(to, "w").write("half a fi")
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(UserError, match="could not download HellaSwag .* no network; pass --data"):
        hellaswag.download(tmp_path / "other")
    assert not any((tmp_path / "other" / "hellaswag").iterdir())  # no partial file left to be taken as whole


def test_the_command_scores_a_run(tok, tmp_path, capsys, monkeypatch):
    """hellaswag --weights RUN --data FILE: the run's saved tokenizer, the same figures as
    score(), --max-examples (or --limit), --json, --model and --tokenizer heeded; bad flags are one-line errors."""
    run, model = scoring_run(tmp_path, tok, 5, 24)
    examples = random_examples(12, seed=6)
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    base = ["hellaswag", "--weights", str(run), "--data", str(data), "--device", "cpu"]
    assert main(base + ["--json", "--max-examples", "10"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = hellaswag.score(model, tok, examples[:10])
    assert (got["examples"], got["acc"], got["acc_norm"], got["tokenizer"]) == \
        (10, want["acc"], want["acc_norm"], "small")
    assert (got["weights"], got["data"], got["kernels"]) == (str(run), str(data), ["reference"])  # auto on a CPU
    # the Triton path (the interpreter here) scores the same
    assert main(base + ["--json", "--limit", "3", "--kernels", "triton"]) == 0  # (lm-eval's name, as lambada's)
    out, err = capsys.readouterr()
    tri = json.loads(out)
    assert err.count("Triton's interpreter, which checks parity but is orders of magnitude slower") == 1, err
    ref = hellaswag.score(model, tok, examples[:3])
    assert tri["kernels"] == ["attention", "cross_entropy", "layernorm", "mlp", "rope"]
    assert (tri["acc"], tri["acc_norm"]) == (ref["acc"], ref["acc_norm"])
    assert main(base) == 0
    out = capsys.readouterr().out
    assert out.startswith("hellaswag: 12 examples: acc ") and "acc_norm" in out
    # --model names the preset of a GPT-2 file's heads: on a checkpoint of another shape it is noted
    assert main(base + ["--max-examples", "1", "--model", "tiny"]) == 0
    assert "(its saved config, used), not tiny's" in capsys.readouterr().err
    # no --data: the validation split, downloaded into --cache-dir
    import shutil
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, to: shutil.copy(data, to))
    assert main(base[:3] + ["--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["examples"], got["data"]) == (12, hellaswag.URL)
    assert (tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl").read_text() == data.read_text()
    assert main(base + ["--json", "--batch-size", "5"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["acc"], again["acc_norm"]) == (got["acc"], got["acc_norm"])
    for bad, said in ((["--max-examples", "0"], "--max-examples must be at least 1, got 0"),
                      (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                      (["--data", str(tmp_path / "none.jsonl")], "none.jsonl"),
                      # --tokenizer over the run's own: here one with more tokens than the model
                      (["--tokenizer", "default"], "tokenizer default has 4096 tokens but the model only 300")):
        assert main(base + bad) == 2
        assert said in capsys.readouterr().err


def _score_as_rank(rank, port, tok, examples, state, rec):
    """One of two torchrun-like gloo processes scoring its share; records which examples it scored."""
    from test_loop import _as_torchrun_rank

    _as_torchrun_rank(rank, port)
    torch.distributed.init_process_group("gloo")
    try:
        model = GPTModel(GPTConfig(**state["config"]))
        model.load_state_dict(state["weights"])
        seen, real = [], hellaswag.ending_losses

        def recording(model, tok, examples, *a, **k):  # patched in this child process only
            seen.extend(ex["ctx"] for ex in examples)
            yield from real(model, tok, examples, *a, **k)

        hellaswag.ending_losses = recording
        result = hellaswag.score(model, tok, examples, batch_size=4, rank=rank, world_size=2)
    finally:
        torch.distributed.destroy_process_group()
    torch.save({"result": result, "seen": seen}, rec / f"rank{rank}.pt")


def test_under_ddp_each_rank_scores_its_share_and_returns_the_whole_figure(tok, tmp_path):
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(5)
    config = dict(vocab_size=tok.vocab_size, context_length=24, n_embd=32, n_layer=2, n_head=2)
    model = GPTModel(GPTConfig(**config)).eval()
    examples = random_examples(11, seed=6)
    want = hellaswag.score(model, tok, examples, batch_size=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = {"config": config, "weights": model.state_dict()}
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_score_as_rank, args=(port, tok, examples, state, tmp_path), nprocs=2, join=True,
                       start_method=method)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert r0["seen"] == [ex["ctx"] for ex in examples[0::2]] and r1["seen"] == [ex["ctx"] for ex in examples[1::2]]
    for r in (r0, r1):
        assert {k: r["result"][k] for k in ("examples", "acc", "acc_norm")} == \
            {k: want[k] for k in ("examples", "acc", "acc_norm")}
    assert 0 < want["acc"] < 1  # neither all right nor all wrong: a missing share would show


def test_a_digit_string_label_with_spaces_is_read_as_its_index(tmp_path):
    """A label string is read as a number once stripped, as int() reads it (from a mutation audit)."""
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps({"ctx": "A man", "endings": ["runs.", "sits.", "eats."], "label": " 2\n"}) + "\n")
    assert hellaswag.read_examples(path)[0]["label"] == 2


@pytest.fixture(scope="module")
def bos_tok():
    """A Llama 2-style tokenizer whose own pipeline prepends <s> (id 1), and the tokenizers.Tokenizer itself."""
    pytest.importorskip("tokenizers")
    from test_hf_tokenizer import build_tokenizer
    from tritongpt.train.hf_tokenizer import HFTokenizer

    raw = build_tokenizer("sentencepiece")
    tok = HFTokenizer(json.loads(raw.to_str()), eos_token="</s>", bos_token="<s>", name="llama2ish")
    assert tok.prepended_bos_id == 1
    return tok, raw


def test_a_tokenizer_that_prepends_bos_gets_it_before_each_context(bos_tok):
    """Each row is transformers' tokenizer(ctx) (BOS first) + the ending's ids; only the ending's tokens are
    counted, at the places the BOS moved them to; the scores are those of each ending run alone after BOS +
    context through the float64 model. A row past the context keeps its last tokens (the BOS goes first)."""
    tok, raw = bos_tok
    seed = int(torch.randint(1 << 30, (1,)))
    examples = random_examples(12, seed=seed)
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_embd=32, n_layer=2, n_head=2))
    model64 = GPTModel(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    want = []
    for ex in examples:
        ctx = raw.encode(ex["ctx"], add_special_tokens=True).ids
        assert ctx[0] == 1 and 1 not in ctx[1:]
        inputs, targets = hellaswag.render(ex, tok, context=128)
        sums, means = [], []
        for i, ending in enumerate(ex["endings"]):
            end = raw.encode(" " + ending, add_special_tokens=False).ids
            row = ctx + end
            assert len(row) <= 129
            assert inputs[i, :len(row) - 1].tolist() == row[:-1]
            assert targets[i, len(ctx) - 1:len(row) - 1].tolist() == end
            assert targets[i, :len(ctx) - 1].eq(-100).all() and targets[i, len(row) - 1:].eq(-100).all()
            with torch.no_grad():
                logp = torch.log_softmax(model64(torch.tensor([row[:-1]])), dim=-1)[0]
            nll = -logp[torch.arange(len(row) - 1), torch.tensor(row[1:])][-len(end):]
            sums.append(float(nll.sum()))
            means.append(float(nll.mean()))
        want.append(torch.tensor([sums, means], dtype=torch.float64))
    got = torch.stack([torch.stack(pair) for pair in hellaswag.ending_losses(model, tok, examples, 5)])
    ref = torch.stack(want)
    assert float((got - ref).norm() / ref.norm()) < 1e-5 and float((got - ref).abs().max()) < 1e-4
    # a row past the context: its last tokens, the BOS cut with the context's head
    ex = {"ctx": "the cat sat on a mat while dogs ran far away", "endings": ["home", "the river bank"], "label": 0}
    inputs, targets = hellaswag.render(ex, tok, context=6)
    end = raw.encode(" the river bank", add_special_tokens=False).ids
    row = (raw.encode(ex["ctx"], add_special_tokens=True).ids + end)[-7:]
    assert inputs[1].tolist() == row[:-1] and targets[1][targets[1] != -100].tolist() == end[-6:]


# other benchmarks' records as the Hugging Face Hub has them (allenai/ai2_arc, allenai/openbookqa, ybisk/piqa,
# cais/mmlu), and the {ctx, endings, label} example each becomes
ARC = {"id": "Mercury_1", "question": "Which is a gas?", "answerKey": "B",
       "choices": {"text": ["rock", "steam", "ice"], "label": ["A", "B", "C"]}}
ARC_NUMERIC = dict(ARC, answerKey="3",
                   choices={"text": ["rock", "steam", "ice", "wood"], "label": ["1", "2", "3", "4"]})
OBQA = {"id": "7-980", "question_stem": "The sun is", "answerKey": "A",
        "choices": {"text": ["a star", "a moon"], "label": ["A", "B"]}}
PIQA = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}
MMLU = {"question": "2 + 2 =", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
WANT = {"arc": {"ctx": "Question: Which is a gas?\nAnswer:", "endings": ["rock", "steam", "ice"], "label": 1},
        "arc_numeric": {"ctx": "Question: Which is a gas?\nAnswer:", "endings": ["rock", "steam", "ice", "wood"],
                        "label": 2},
        "obqa": {"ctx": "Question: The sun is\nAnswer:", "endings": ["a star", "a moon"], "label": 0},
        "piqa": {"ctx": "Question: Open a jar\nAnswer:", "endings": ["twist the lid", "eat the lid"], "label": 0},
        "mmlu": {"ctx": "Question: 2 + 2 =\nAnswer:", "endings": ["3", "4", "5", "6"], "label": 1}}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_arc_openbookqa_piqa_and_mmlu_records_become_examples(tmp_path):
    for name, rows in (("arc", [ARC]), ("arc_numeric", [ARC_NUMERIC]), ("obqa", [OBQA]), ("piqa", [PIQA]),
                       ("mmlu", [MMLU])):
        assert hellaswag.read_examples(_write(tmp_path / f"{name}.jsonl", rows)) == [WANT[name]], name
    # ARC's numeric answerKey rows mixed with lettered ones, as in the real split; PIQA's label 1; MMLU's
    # answer as a digit string
    got = hellaswag.read_examples(_write(tmp_path / "mix.jsonl", [ARC, ARC_NUMERIC, dict(ARC, answerKey="C")]))
    assert [ex["label"] for ex in got] == [1, 2, 2]
    assert hellaswag.read_examples(_write(tmp_path / "s.jsonl", [dict(ARC, answerKey=" C\n")]))[0]["label"] == 2
    assert hellaswag.read_examples(_write(tmp_path / "p.jsonl", [dict(PIQA, label=1)]))[0]["label"] == 1
    assert hellaswag.read_examples(_write(tmp_path / "m.jsonl", [dict(MMLU, answer="3")]))[0]["label"] == 3
    (tmp_path / "arc.json").write_text(json.dumps([ARC, OBQA]))  # OpenBookQA is ARC's shape with question_stem
    assert hellaswag.read_examples(tmp_path / "arc.json") == [WANT["arc"], WANT["obqa"]]


def test_a_parquet_file_of_another_shape_is_read(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ARC, ARC_NUMERIC]), tmp_path / "arc.parquet")
    assert hellaswag.read_examples(tmp_path / "arc.parquet") == [WANT["arc"], WANT["arc_numeric"]]
    pq.write_table(pa.Table.from_pylist([MMLU]), tmp_path / "mmlu.parquet")
    assert hellaswag.read_examples(tmp_path / "mmlu.parquet") == [WANT["mmlu"]]


def test_a_bad_record_of_another_shape_is_named(tmp_path):
    path = tmp_path / "b.jsonl"
    cases = [(ARC, dict(ARC, answerKey="D"), r"'answerKey' must be one of the choices' labels \['A', 'B', 'C'\], "
                                             "got 'D'"),
             (ARC, {k: v for k, v in ARC.items() if k != "answerKey"}, "'answerKey' must be one of"),
             (ARC, dict(ARC, answerKey=2), "'answerKey' must be one of"),
             (ARC_NUMERIC, dict(ARC_NUMERIC, answerKey=3), "'answerKey' must be one of"),  # a text, as the Hub has it
             (ARC, dict(ARC, question=" "), "'question' must be the question text"),
             (ARC, {k: v for k, v in ARC.items() if k != "question"}, "'question' must be the question text"),
             (ARC, dict(ARC, choices=["rock", "steam"]), "'choices' must be an object with 'text' and 'label'"),
             (ARC, dict(ARC, choices={"text": ["rock", ""], "label": ["A", "B"]}), "'choices.text' must be a list"),
             (ARC, dict(ARC, choices={"text": ["a", "b", "c"], "label": ["A", "B"]}),
              "'choices.label' must be a list of 3 labels"),
             (OBQA, dict(OBQA, question_stem=""), "'question_stem' must be the question text"),
             (PIQA, dict(PIQA, label=2), r"'label' must be the index of the right ending \(0..1\), got 2"),
             (PIQA, dict(PIQA, label=True), "'label' must be the index"),
             (PIQA, dict(PIQA, sol2=""), "'sol2' must be the second solution"),
             (PIQA, {k: v for k, v in PIQA.items() if k != "sol1"}, "'sol1' must be the first solution"),
             (PIQA, dict(PIQA, goal=None), "'goal' must be the goal text"),
             (MMLU, dict(MMLU, answer=4), r"'answer' must be the index of the right ending \(0..3\), got 4"),
             (MMLU, dict(MMLU, answer=-1), "'answer' must be the index"),
             (MMLU, dict(MMLU, choices=["only"]), "'choices' must be a list of at least 2 choice texts"),
             (MMLU, dict(MMLU, choices=["a", " "]), "'choices' must be a list of at least 2 choice texts"),
             (MMLU, dict(MMLU, question=""), "'question' must be the question text")]
    for good, bad, said in cases:
        _write(path, [good, bad])
        with pytest.raises(UserError, match=r"b.jsonl: record 1 \(line 2\): " + said):
            hellaswag.read_examples(path)
    # a file mixing shapes is refused at the first record of another
    hs = {"ctx": "A man", "endings": ["runs.", "sits."], "label": 1}
    for first, other, said in ((ARC, PIQA, "a record of PIQA's shape .* in a file of ARC/OpenBookQA's"),
                               (hs, MMLU, "a record of MMLU's shape .* in a file of HellaSwag's"),
                               (MMLU, hs, "a record of HellaSwag's shape .* in a file of MMLU's"),
                               (PIQA, OBQA, "a record of ARC/OpenBookQA's shape .* in a file of PIQA's")):
        _write(path, [first, first, other])
        with pytest.raises(UserError, match=r"b.jsonl: record 2 \(line 3\): " + said):
            hellaswag.read_examples(path)
    # a first record of no known shape (or of two) is named with what is read
    for first in ({"prompt": "x", "completion": "y"}, dict(PIQA, answer=1)):
        _write(path, [first])
        with pytest.raises(UserError, match=r"b.jsonl: record 0 \(line 1\): not a record of one known shape"):
            hellaswag.read_examples(path)


def test_the_command_scores_an_arc_file_as_its_converted_examples(tok, tmp_path, capsys):
    run, model = scoring_run(tmp_path, tok, 7, 32)
    rows = []
    for i, ex in enumerate(random_examples(16, seed=8)):
        letters = "ABCD" if i % 3 else "1234"  # some of ARC's rows are numbered
        rows.append({"id": str(i), "question": ex["ctx"], "answerKey": letters[ex["label"]],
                     "choices": {"text": ex["endings"], "label": list(letters)}})
    data = _write(tmp_path / "arc.jsonl", rows)
    assert main(["hellaswag", "--weights", str(run), "--data", str(data), "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    converted = [{"ctx": f"Question: {r['question']}\nAnswer:", "endings": r["choices"]["text"],
                  "label": r["choices"]["label"].index(r["answerKey"])} for r in rows]
    want = hellaswag.score(model, tok, converted)
    assert (got["examples"], got["acc"], got["acc_norm"]) == (16, want["acc"], want["acc_norm"])
    assert 0 < want["acc"] < 1 and 0 < want["acc_norm"] < 1  # not a figure a wrong label could match


# allenai/winogrande's records: the answer a string, "" in its test split
WINO = {"sentence": "The trophy did not fit in the case because the _ was too big.", "option1": "trophy",
        "option2": "case", "answer": "1"}
WINO_WANT = {"ctxs": ["The trophy did not fit in the case because the trophy",
                      "The trophy did not fit in the case because the case"],
             "ending": "was too big.", "label": 0}


def random_winogrande(n, seed):
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g))

    # blanks mid-sentence and next to punctuation ("_'s"), as the real sentences have them
    return [{"sentence": f"{text(2, 10)} _{' ' if i % 3 else chr(39) + 's '}{text(1, 8)}.", "option1": text(1, 3),
             "option2": text(1, 4), "answer": "12"[int(torch.randint(2, (1,), generator=g))], "qID": str(i)}
            for i in range(n)]


def test_a_winogrande_record_is_two_contexts_and_one_ending(tmp_path):
    assert hellaswag.read_shaped(_write(tmp_path / "w.jsonl", [WINO])) == ("WinoGrande", [WINO_WANT])
    got = hellaswag.read_examples(_write(tmp_path / "w.jsonl", [dict(WINO, answer=" 2\n"), dict(WINO, answer="1")]))
    assert [ex["label"] for ex in got] == [1, 0]
    # the blank right before punctuation: the ending is the rest, stripped, after a space
    ex = hellaswag.read_examples(_write(tmp_path / "w.jsonl", [dict(WINO, sentence="It was _'s turn  to go. ")]))[0]
    assert ex["ctxs"] == ["It was trophy", "It was case"] and ex["ending"] == "'s turn  to go."
    assert hellaswag.rows(ex) == [("It was trophy", "'s turn  to go."), ("It was case", "'s turn  to go.")]
    piqa = WANT["piqa"]
    assert hellaswag.rows(piqa) == [(piqa["ctx"], "twist the lid"), (piqa["ctx"], "eat the lid")]
    # the shapes the other benchmarks' files are read as are named with them
    for name, row in (("ARC/OpenBookQA", ARC), ("PIQA", PIQA), ("MMLU", MMLU),
                      ("HellaSwag", {"ctx": "A", "endings": ["b", "c"], "label": 0})):
        assert hellaswag.read_shaped(_write(tmp_path / "s.jsonl", [row]))[0] == name
    with pytest.raises(UserError, match="multiple-choice file not found"):
        hellaswag.read_shaped(tmp_path / "none.jsonl")


def test_winogrande_is_scored_on_the_shared_ending_after_each_option(tok):
    """lm-eval's partial scoring, computed directly: for each option, the float64 model run on
    tokens(sentence[:i] + option) + tokens(" " + rest), -log p of the rest's tokens summed; the answer the
    option with the smaller sum. Rows past the context keep their last tokens."""
    torch.manual_seed(11)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=20, n_embd=32, n_layer=2, n_head=2))
    model64 = GPTModel(model.config).double().eval()
    model64.load_state_dict(model.state_dict())
    records = random_winogrande(24, seed=12)
    examples = [hellaswag._winogrande(r, "w") for r in records]
    want, right = [], 0
    for r in records:
        i = r["sentence"].index("_")
        rest = tok.encode(" " + r["sentence"][i + 1:].strip())
        sums = []
        for option in (r["option1"], r["option2"]):
            row = torch.tensor((tok.encode(r["sentence"][:i] + option) + rest)[-21:])
            with torch.no_grad():
                logp = torch.log_softmax(model64(row[None, :-1]), dim=-1)[0]
            sums.append(float(-logp[torch.arange(len(row) - 1), row[1:]][-len(rest):].sum()))
        want.append(sums)
        right += min(range(2), key=sums.__getitem__) == int(r["answer"]) - 1
    assert max(len(tok.encode(r["sentence"])) for r in records) > 21  # some rows are cut
    for batch_size in (1, 5, 24):
        got = torch.stack([total for total, _ in hellaswag.ending_losses(model, tok, examples, batch_size)])
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4), batch_size
        result = hellaswag.score(model, tok, examples, batch_size=batch_size)
        assert result["acc"] == right / 24 and "acc_norm" not in result
    assert 0 < right < 24


def test_a_bad_winogrande_record_is_named(tmp_path):
    path = tmp_path / "w.jsonl"
    no_answer = {k: v for k, v in WINO.items() if k != "answer"}
    for bad, said in ((dict(WINO, answer=""), "'answer' must be \"1\" or \"2\" \\(the right option\\), got ''"),
                      (no_answer, "'answer' must be \"1\" or \"2\""),
                      (dict(WINO, answer="3"), "'answer' must be \"1\" or \"2\""),
                      (dict(WINO, answer="0"), "'answer' must be \"1\" or \"2\""),
                      (dict(WINO, answer=1), "'answer' must be \"1\" or \"2\""),
                      (dict(WINO, sentence="No blank here."), "'sentence' must have one '_'"),
                      (dict(WINO, sentence="Two _ blanks _ here."), "'sentence' must have one '_'"),
                      (dict(WINO, sentence="It ends with _ "), "'sentence' must go on after its '_'"),
                      (dict(WINO, sentence=""), "'sentence' must be the sentence"),
                      (dict(WINO, option1=""), "'option1' must be the first option"),
                      ({k: v for k, v in WINO.items() if k != "option2"}, "'option2' must be the second option")):
        _write(path, [WINO, bad])
        with pytest.raises(UserError, match=r"w.jsonl: record 1 \(line 2\): " + said):
            hellaswag.read_examples(path)
    hs = {"ctx": "A man", "endings": ["runs.", "sits."], "label": 1}
    for first, other, said in ((WINO, MMLU, "a record of MMLU's shape .* in a file of WinoGrande's"),
                               (MMLU, WINO, "a record of WinoGrande's shape .* in a file of MMLU's"),
                               (hs, WINO, "a record of WinoGrande's shape .* in a file of HellaSwag's"),
                               (WINO, PIQA, "a record of PIQA's shape .* in a file of WinoGrande's")):
        _write(path, [first, other])
        with pytest.raises(UserError, match=r"w.jsonl: record 1 \(line 2\): " + said):
            hellaswag.read_examples(path)


def test_the_command_scores_a_winogrande_file_and_names_it(tok, tmp_path, capsys):
    run, model = scoring_run(tmp_path, tok, 13, 32)
    records = random_winogrande(14, seed=14)
    data = _write(tmp_path / "wino.jsonl", records)
    base = ["hellaswag", "--weights", str(run), "--data", str(data), "--device", "cpu"]
    assert main(base + ["--json", "--batch-size", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = hellaswag.score(model, tok, [hellaswag._winogrande(r, "w") for r in records])
    assert (got["examples"], got["acc"], got["benchmark"]) == (14, want["acc"], "WinoGrande")
    assert "acc_norm" not in got and 0 < want["acc"] < 1
    assert main(base) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"WinoGrande: 14 examples: acc {want['acc']:.4f}, no acc_norm: both options are scored "
                          "on one ending")
    # another benchmark's file is named by its shape, a missing one as a multiple-choice file
    arc = _write(tmp_path / "arc.jsonl", [ARC, ARC_NUMERIC])
    assert main(base[:3] + ["--data", str(arc), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("ARC/OpenBookQA: 2 examples: acc ")
    assert main(base[:3] + ["--data", str(tmp_path / "none.jsonl"), "--device", "cpu"]) == 2
    assert "multiple-choice file not found" in capsys.readouterr().err
