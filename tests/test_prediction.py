"""Predicted outputs (generate.Prediction, OpenAI's `prediction`): where a row stands in the prediction and what it
proposes, by hand; greedy text the model's own with any prediction (its own answer, an edited one, a shifted one,
a wrong one), in generate() and in the batching engine (slots, pages, n rows, beside n-gram speculation); the
accepted and rejected counts; the refusals. (serve's `prediction`: tests/test_serve.py.)"""
import pytest
import torch
from parity import loud_attention
from test_engine import prompt, tiny

from tritongpt.errors import UserError
from tritongpt.train.engine import Engine
from tritongpt.train.generate import Prediction, generate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def proposed(pred, rows, start, k, vocab_limit=None):
    drafted, lens = pred.propose(torch.tensor(rows), start, k, vocab_limit)
    assert drafted.size(1) == int(lens.max())
    return [d[:n] for d, n in zip(drafted.tolist(), lens.tolist())]


def test_where_a_row_stands_and_what_it_proposes():
    P = [10, 11, 12, 13, 14, 10, 11, 15, 16]
    p = Prediction(P, max_ngram=2)
    assert proposed(p, [[1, 2]], 2, 3) == [[10, 11, 12]]  # nothing generated yet: the prediction's start
    assert proposed(p, [[1, 2, 10, 11]], 2, 3) == [[12, 13, 14]]  # followed: on from there
    assert proposed(p, [[1, 2, 10, 11, 12, 13, 14, 10, 11]], 2, 2) == [[15, 16]]  # in place (not (10, 11)'s first)
    assert proposed(p, [[1, 2, 10, 11, 12, 13, 14, 10, 11, 15, 16]], 2, 2) == [[]]  # at its end: nothing left
    p = Prediction(P, max_ngram=2)
    assert proposed(p, [[1, 2, 10, 11, 12, 99]], 2, 3) == [[]]  # departed (99 is nowhere): nothing
    assert proposed(p, [[1, 2, 10, 11, 12, 99, 14, 10]], 2, 3) == [[11, 15, 16]]  # back: (14, 10) found, after it
    # a lost row finds its n-gram's first match ending past where it departed (never there or before: the model
    # just refused what that place proposes)
    p = Prediction([5, 6, 7, 5, 6, 8, 5, 6, 9], max_ngram=2)
    assert proposed(p, [[0, 5, 6, 7, 5, 1, 5, 6]], 1, 1) == [[8]]  # departed at 4: (5, 6) ending at 5, not at 2
    p = Prediction([5, 6, 7, 5, 6, 8, 1, 2, 3], max_ngram=2)
    assert proposed(p, [[0, 5, 6, 7, 5, 6, 8, 9, 5, 6]], 1, 1) == [[]]  # departed at 6: (5, 6) only before it
    p = Prediction([4, 4, 4, 1, 2, 3], max_ngram=2)
    assert proposed(p, [[0, 4, 4, 4, 4]], 1, 1) == [[]]  # refused 1 at 3: (4, 4) ending at 3 would propose it again
    assert proposed(p, [[0, 4, 4, 4, 4, 2]], 1, 1) == [[3]]  # (2) ends past it
    # rows on their own; a token never drawn (>= vocab_limit) ends a row's proposals; k cuts them
    p = Prediction([3, 4, 50, 5], max_ngram=2)
    assert proposed(p, [[1, 3], [1, 7]], 2, 4, vocab_limit=40) == [[3, 4], [3, 4]]  # (first call: nothing read)
    assert proposed(p, [[1, 3, 3], [1, 7, 9]], 2, 4, vocab_limit=40) == [[4], []]
    assert proposed(Prediction([], 3), [[1, 2]], 2, 4) == [[]]
    assert proposed(Prediction([1, 2, 3]), [[1, 2]], 2, 0) == [[]]


@pytest.fixture(scope="module")
def model():
    """Attention loud enough that its tokens read the cache (loud_attention's 20 collapses a tiny model's greedy
    text onto a token or two; 2 keeps it varied)."""
    return loud_attention(tiny(), gain=2.0)


def edits(answer):
    """Predictions of a 30-token answer: itself, one with a token replaced, one with tokens cut out, one with tokens
    put in, and one of other tokens."""
    other = [(t + 1) % 97 for t in answer]
    return {"itself": answer, "replaced": answer[:5] + [other[5]] + answer[6:],
            "cut": answer[:8] + answer[13:], "inserted": answer[:15] + other[:4] + answer[15:], "wrong": other[:12]}


def test_greedy_is_the_models_own_answer_whatever_the_prediction(model):
    idx = prompt(6, seed=3)
    plain = generate(model, idx, 30)
    answer = plain[0, 6:].tolist()
    assert len(set(answer)) > 10
    counts = {}
    for name, ids in edits(answer).items():
        p, stats = Prediction(ids), {}
        drawn = []
        got = generate(model, idx, 30, draft=p, stats=stats, on_token=drawn.append)
        assert torch.equal(got, plain), name
        assert torch.equal(torch.cat(drawn, dim=1), got[:, 6:])
        assert (p.accepted, p.accepted + p.rejected) == (stats["accepted"], stats["drafted"])
        counts[name] = (p.accepted, p.rejected, stats["target_forwards"])
    # 10 proposals a step, each step's last token the model's own: 11 + 11 + 8 tokens in three forwards
    assert counts["itself"] == (27, 0, 3)
    for name in ("replaced", "cut", "inserted"):  # found again after the edit: most kept, some refused
        assert counts[name][0] >= 20 and counts[name][1] > 0 and counts[name][2] < 15, (name, counts[name])
    assert counts["wrong"][0] == 0 and counts["wrong"][2] >= 29


def test_rows_keep_their_own_places_and_end_at_an_eos(model):
    idx = torch.cat([prompt(6, seed=3), prompt(6, seed=4)])
    plain = generate(model, idx, 20)
    a, b = plain[0, 6:].tolist(), plain[1, 6:].tolist()
    p = Prediction(a + b)  # row 0 follows the first part, row 1 finds its own text after it
    assert torch.equal(generate(model, idx, 20, draft=p), plain)
    assert p.accepted > 25 and p.rejected > 0
    eos = a[7]
    want = generate(model, idx, 20, eos_id=eos)
    assert torch.equal(generate(model, idx, 20, eos_id=eos, draft=Prediction(a)), want)


def test_the_engine_speculates_a_request_with_a_prediction():
    model = loud_attention(tiny(), gain=2.0)
    idx = prompt(6, seed=3)
    plain = generate(model, idx, 30)
    answer = plain[0, 6:].tolist()
    # (with a draft model, the request with a prediction keeps it; the plain one beside it drafts with the model)
    for kw in ({}, dict(kv_pages=24, page_size=4), dict(prompt_lookup=2, num_draft_tokens=4),
               dict(draft=model, num_draft_tokens=4)):
        engine = Engine(model, max_batch=4, **kw)
        p = Prediction(edits(answer)["replaced"])
        with_it = engine.submit(idx.expand(2, -1).clone(), 30, prediction=p)
        other = engine.submit(prompt(5, seed=9), 12)  # a plain request beside it
        steps = 0
        while engine.running or engine.waiting:
            engine.step()
            steps += 1
        assert torch.equal(with_it.wait(), plain.expand(2, -1)), kw
        assert torch.equal(other.wait(), generate(model, prompt(5, seed=9), 12)), kw
        assert p.accepted >= 40 and p.rejected > 0 and steps < 20, (kw, p.accepted, p.rejected, steps)
        if "prompt_lookup" in kw or "draft" in kw:  # a server's speculation counters count a prediction's drafts too
            assert engine.stats["spec_decode_num_accepted_tokens"] >= p.accepted
    # a request that cannot speculate (logprobs) decodes plainly: nothing proposed
    engine = Engine(model, max_batch=2)
    p = Prediction(answer)
    h = engine.submit(idx, 10, prediction=p, logprobs=0)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(h.wait(), plain[:, :16]) and (p.accepted, p.rejected) == (0, 0)


def test_refusals(model):
    with pytest.raises(UserError, match="list of token ids"):
        Prediction("some text")
    with pytest.raises(UserError, match="list of token ids"):
        Prediction([1, -2])
    with pytest.raises(UserError, match="max_ngram"):
        Prediction([1], max_ngram=0)
    with pytest.raises(UserError, match="generate.Prediction"):
        Engine(model, max_batch=1).submit(prompt(4), 3, prediction=[1, 2])
    with pytest.raises(UserError, match="a prediction. keeps the text within"):
        generate(model, prompt(30), 20, draft=Prediction([1, 2]))


def test_the_generate_command_with_a_prediction(tmp_path, capsys):
    """`generate --prediction FILE`: the text without it, the acceptance on stderr; refused beside another draft,
    beam search, --cuda-graphs and --prompts, by name."""
    from tritongpt import cli
    from tritongpt.model.config import GPTConfig, get_config
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(0)
    weights = tmp_path / "model.safetensors"
    loud_attention(GPTModel(GPTConfig(**{**get_config("tiny").to_dict(), "n_layer": 2, "context_length": 64})),
                   gain=2.0).save(weights)
    base = ["generate", "--weights", str(weights), "--device", "cpu", "--prompt", "the cat sat on the mat.",
            "--max-new-tokens", "16", "--temperature", "0"]
    assert cli.main(base) == 0
    want = capsys.readouterr().out
    predicted = tmp_path / "predicted.txt"
    predicted.write_text(want.rstrip("\n")[len("the cat sat on the mat."):])  # (the answer as printed)
    assert cli.main([*base, "--prediction", str(predicted)]) == 0
    out = capsys.readouterr()
    assert out.out == want and "the prediction: " in out.err and "draft tokens accepted per forward" in out.err
    accepted = int(out.err.split("accepted per forward of the model (")[1].split(" ")[0])
    assert accepted >= 8, out.err
    cases = [(["--prompt-lookup", "2"], "--prompt-lookup and --prediction are two drafts"),
             (["--num-beams", "2"], "--num-beams (beam search) does not take --prediction"),
             (["--cuda-graphs"], "--cuda-graphs replays a one-token decode step: it does not take --draft, "
                                 "--prompt-lookup, --prediction"),
             (["--prompts", str(predicted), "--out", str(tmp_path / "o.jsonl")], "--prompts does not take "
                                                                                   "--prediction")]
    for extra, said in cases:
        argv = [*base, "--prediction", str(predicted), *extra]
        if "--prompts" in extra:
            argv[5:7] = []  # (not --prompt)
        assert cli.main(argv) == 2, extra
        err = capsys.readouterr().err
        assert said in err, (extra, err)
    assert cli.main([*base, "--prediction", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_a_bad_or_used_prediction_is_refused_at_submit_not_in_the_batch(model):
    """A prediction's token past the model's vocabulary would fail the verifying forward, and with it every request
    in the engine's batch; a Prediction already in use (its rows' places another call's) would index rows it does
    not have, or start from another answer's place: both refused by name before any work."""
    V = model.config.vocab_size
    engine = Engine(model, max_batch=2)
    other = engine.submit(prompt(5, seed=9), 6)
    engine.step()
    with pytest.raises(UserError, match=f"prediction's token id {V + 5} is outside the model's vocabulary"):
        engine.submit(prompt(6, seed=3), 5, prediction=Prediction([1, V + 5]))
    p = Prediction([1, 2, 3])
    engine.submit(prompt(6, seed=3), 5, prediction=p)
    with pytest.raises(UserError, match="one Prediction a call"):
        engine.submit(prompt(6, seed=3).expand(2, -1), 5, prediction=p)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(other.wait(), generate(model, prompt(5, seed=9), 6))
    with pytest.raises(UserError, match="one Prediction a call"):
        generate(model, prompt(6, seed=3), 5, draft=p)
    with pytest.raises(UserError, match=f"prediction's token id {V} is outside"):
        generate(model, prompt(6, seed=3), 5, draft=Prediction([V]))


def test_a_proposal_kept_past_the_rows_common_length_counts_as_accepted():
    """Rows keep a common m draft tokens a step (keep_common); a row that accepted more keeps its (m + 1)-th proposal
    as the step's last token: in its answer, so accepted (OpenAI's), never rejected. Row 0's proposals all right,
    row 1's first wrong: m = 0, row 0 keeps one proposal, row 1 the model's own token."""
    from tritongpt.train.generate import verify_step

    text = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 4]])  # the text (L = 2) and each row's two proposals
    logits = torch.full((2, 3, 5), -5.0)
    for b, want in enumerate(([2, 3, 1], [0, 1, 1])):  # the model's greedy token at each verified position
        logits[b, torch.arange(3), want] = 5.0
    p = Prediction([2, 3])
    idx, m, *_, offered, accepted = verify_step(logits, text, 2, 2, torch.zeros(2, dtype=torch.bool),
                                                {"temperature": 0.0}, None, None, None, None, None,
                                                torch.tensor([2, 2]), None, None, prediction=p)
    assert idx.tolist() == [[0, 1, 2], [0, 1, 0]] and m == 0 and (offered, accepted) == (4, 0)
    assert (p.accepted, p.rejected) == (1, 3)
