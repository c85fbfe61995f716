"""Prompt lookup decoding (generate(prompt_lookup=N), `tritongpt generate --prompt-lookup N`): the lookup's proposals
against a plain search, greedy output the model's own, sampled output distributed as the model's; the refusals."""
import pytest
import torch
from parity import loud_attention
from test_speculative import V, WARP, alone, exact_first_two, tiny, tv_bound

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.generate import PromptLookup, accept_lookup, generate, lookup_proposals, sampling_logits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def search(row: list, N: int, k: int) -> list:
    """The proposals, token by token: the last n-gram (n = N .. 1), its most recent earlier start, what followed."""
    T = len(row)
    for n in range(min(N, T - 1), 0, -1):
        for i in range(T - n - 1, -1, -1):  # not i = T - n: the last n-gram itself
            if row[i:i + n] == row[T - n:]:
                return row[i + n:i + n + k]
    return []


def proposals(rows, N, k):
    drafted, lens = lookup_proposals(torch.tensor(rows), N, k)
    assert drafted.size(1) == int(lens.max())
    return [d[:n] for d, n in zip(drafted.tolist(), lens.tolist())]


def test_the_proposals_by_hand():
    assert proposals([[1, 2, 3, 9, 1, 2, 4, 5, 1, 2]], 2, 3) == [[4, 5, 1]]  # the most recent (1, 2), not the first
    assert proposals([[1, 2, 8, 9, 2, 6, 1, 2]], 2, 3) == [[8, 9, 2]]  # the bigram before the more recent unigram
    assert proposals([[1, 2, 8, 9, 2, 6, 1, 2]], 1, 3) == [[6, 1, 2]]
    assert proposals([[1, 2, 3, 4]], 3, 5) == [[]]  # found nowhere
    assert proposals([[3, 7, 3]], 1, 5) == [[7, 3]]  # cut at the end of the text
    assert proposals([[3, 7, 3]], 1, 1) == [[7]]  # cut at k
    assert proposals([[4, 4]], 2, 5) == [[4]]  # the last n-gram itself is no match: only one token follows
    assert proposals([[5]], 2, 5) == [[]]
    # rows on their own in one batch: padding past each row's own
    drafted, lens = lookup_proposals(torch.tensor([[1, 2, 1, 2], [1, 2, 3, 4], [4, 4, 4, 4]]), 2, 3)
    assert lens.tolist() == [2, 0, 1] and drafted.tolist() == [[1, 2], [0, 0], [4, 0]]


@pytest.mark.parametrize("N,k", [(1, 1), (2, 3), (3, 10)])
def test_the_proposals_against_a_plain_search(N, k):
    g = torch.Generator().manual_seed(10 * N + k)
    for T in (2, 7, 15):
        rows = torch.randint(0, 4, (300, T), generator=g).tolist()
        got = proposals(rows, N, k)
        assert got == [search(r, N, k) for r in rows]
        assert any(got) and (T > 2 or not all(got))  # found, and (short rows) not found


@pytest.fixture(scope="module")
def target():
    return tiny(0)


@pytest.fixture(scope="module")
def loud():
    """The model with loud attention: proposals verified over the wrong keys or values would not give plain
    greedy's tokens, where the plain model's tokens hardly read the cache."""
    return loud_attention(tiny(0))


def repetitive(B, seed):
    """B prompts of 12 tokens, each a random 4-token phrase said three times."""
    return torch.randint(0, 61, (B, 4), generator=torch.Generator().manual_seed(seed)).repeat(1, 3)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("N,K", [(1, 3), (2, 10)])
def test_greedy_is_plain_greedy(loud, B, N, K):
    """Token for token each row's plain greedy output, with proposals accepted; ended by an EOS, a stop string, and
    under the penalties and the n-gram ban."""
    idx, new = repetitive(B, 10 * B + N), 20
    plain = [r[12:] for r in alone(loud, idx, new)]
    drawn, stats = [], {}
    got = generate(loud, idx, new, prompt_lookup=N, num_draft_tokens=K, stats=stats, on_token=drawn.append)
    assert got.tolist() == alone(loud, idx, new)
    assert torch.equal(torch.cat(drawn, dim=1), got[:, 12:])
    assert 0 < stats["accepted"] <= stats["drafted"] and stats["target_forwards"] < new
    eos = plain[0][3]
    want = torch.tensor(alone(loud, idx, new, pad=eos, eos_id=eos))
    assert torch.equal(generate(loud, idx, new, eos_id=eos, prompt_lookup=N, num_draft_tokens=K), want)
    pair = torch.tensor(plain[-1][5:7])

    def stop(rows):
        return (rows[:, -2:] == pair).all(dim=1)

    want = alone(loud, idx, new, stop=stop)
    got = generate(loud, idx, new, stop=stop, prompt_lookup=N, num_draft_tokens=K)
    assert got.size(1) == max(map(len, want)) and min(map(len, want)) < 12 + new  # the last row stopped early
    for row, w in zip(got.tolist(), want):
        assert row[:len(w)] == w
    warp = dict(repetition_penalty=1.3, frequency_penalty=0.4, no_repeat_ngram_size=3, vocab_limit=50)
    assert generate(loud, idx, new, prompt_lookup=N, num_draft_tokens=K, **warp).tolist() == \
        alone(loud, idx, new, **warp)


def test_a_random_text_proposes_nothing_and_is_plain_decoding(target):
    idx = torch.arange(1, 13).unsqueeze(0)  # no token twice: nothing to look up at first
    stats = {}
    assert torch.equal(generate(target, idx, 3, prompt_lookup=2, stats=stats), generate(target, idx, 3))
    assert stats["target_forwards"] >= 1 and stats["accepted"] <= stats["drafted"]


def test_proposals_end_before_a_token_never_drawn_and_count_per_row(loud, monkeypatch):
    """Row 0 would propose [52, 50, 51], ids past vocab_limit (never drawn): nothing; row 1 proposes [3, 1, 2]. The
    proposals counted are each row's own."""
    from tritongpt.train import generate as gen

    calls, real = [], gen.accept_lookup

    def spy(p_logits, drafted, lens, greedy, generator=None):
        calls.append(lens.tolist())
        return real(p_logits, drafted, lens, greedy, generator)

    monkeypatch.setattr(gen, "accept_lookup", spy)
    idx = torch.tensor([[50, 51, 52, 50, 51], [1, 2, 3, 1, 2]])
    stats = {}
    got = generate(loud, idx, 8, vocab_limit=40, prompt_lookup=2, num_draft_tokens=3, stats=stats)
    assert got.tolist() == alone(loud, idx, 8, vocab_limit=40)
    assert calls[0] == [0, 3] and stats["drafted"] == sum(map(sum, calls)) and len(calls) == stats["target_forwards"]


def test_a_row_proposing_nothing_samples_plain_decodings_text(target):
    """A sampled step with no proposals is a plain step, the generator's draws included: one row whose text repeats
    nothing is plain sampling's text for the same seed (an extra draw a step would shift every later one)."""
    idx, same = torch.arange(1, 13).unsqueeze(0), 0
    for seed in range(8):
        stats, runs = {}, []
        for lookup in (dict(prompt_lookup=2, stats=stats), {}):
            runs.append(generate(target, idx, 4, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                                 **lookup))
        if stats["drafted"] == 0:  # (a drawn token that repeats one proposes)
            assert torch.equal(*runs), seed
            same += 1
    assert same >= 3


# -- sampling: the model's distribution ------------------------------------------------------------------------

# proposing 2 tokens ([3, 1], after the bigram (2, 3)), 1 (3, after (3, 3), cut at the end of the text) and none
PROMPTS = torch.tensor([[2, 3, 3, 1, 2, 3], [2, 4, 1, 3, 3, 3], [0, 0, 1, 2, 3, 4]])


@pytest.fixture(scope="module")
def small():
    return tiny(2, vocab=V, n_embd=16, n_layer=1, context=8, sharpen=6.0)


def test_accept_lookup_draws_the_models_distribution(small):
    """20000 steps a prompt at once, the rows proposing 2, 1 and no tokens: each prompt's first two tokens are
    distributed as the model's to within what chance allows once in a million."""
    N, g = 20000, torch.Generator().manual_seed(0)
    drafted, lens = lookup_proposals(PROMPTS, 2, 2)
    assert lens.tolist() == [2, 1, 0] and drafted[0].tolist() == [3, 1] and drafted[1, 0] == 3
    rows = torch.cat([PROMPTS, drafted], dim=1).repeat_interleave(N, dim=0)
    lens = lens.repeat_interleave(N)
    logits = small(rows)[:, -3:]
    p_logits = torch.stack([sampling_logits(logits[:, j], **WARP) for j in range(3)], dim=1)
    n, nxt = accept_lookup(p_logits, rows[:, 6:], lens, False, g)
    nxt = nxt.squeeze(1)
    assert bool((n <= lens).all())
    for r in range(2):  # refusals, and acceptances, both common where there are proposals
        assert 0.1 < (n[r * N:(r + 1) * N] < 1).float().mean() < 0.9
    for r in range(3):
        want = exact_first_two(small, PROMPTS[r:r + 1])
        sl = slice(r * N, (r + 1) * N)
        nr, xr, dr = n[sl], nxt[sl], rows[sl, 6:]
        first = torch.where(nr >= 1, dr[:, 0], xr)
        after = torch.multinomial(want[first] / want[first].sum(-1, keepdim=True), 1, generator=g).squeeze(1)
        second = torch.where(nr >= 2, dr[:, 1], torch.where(nr == 1, xr, after))
        seen = torch.bincount(first * V + second, minlength=V * V).double() / N
        l1 = (seen - want.flatten().double()).abs().sum().item()
        assert l1 < tv_bound(V * V, N), (r, l1)


@pytest.mark.parametrize("rows", [[0, 1, 2], [0]], ids=["batch", "alone"])
def test_generate_with_prompt_lookup_samples_the_models_distribution(small, rows):
    """The whole path, generate(): the three prompts in one batch (the row proposing nothing makes every step keep
    one token) and the first alone (two kept at a step); fewer draws, a looser bound."""
    prompts, N, g = PROMPTS[rows], 400, torch.Generator().manual_seed(1)
    B = len(rows)
    counts = torch.zeros(B, V * V, dtype=torch.double)
    for _ in range(N):
        out = generate(small, prompts, 2, generator=g, prompt_lookup=2, num_draft_tokens=2, **WARP)[:, 6:]
        counts[torch.arange(B), out[:, 0] * V + out[:, 1]] += 1
    for r in range(B):
        want = exact_first_two(small, prompts[r:r + 1]).flatten().double()
        l1 = (counts[r] / N - want).abs().sum().item()
        assert l1 < tv_bound(V * V, N), (r, l1)


# -- refusals and the command ----------------------------------------------------------------------------------

def test_refusals(target, monkeypatch):
    idx = torch.tensor([[1, 2, 3]])
    cases = [(dict(prompt_lookup=0), "prompt_lookup .* must be a positive integer"),
             (dict(prompt_lookup=2.0), "prompt_lookup .* must be a positive integer"),
             (dict(prompt_lookup=2, draft=target), "draft and prompt_lookup are two drafts"),
             (dict(prompt_lookup=2, num_draft_tokens=0), "num_draft_tokens must be a positive integer"),
             (dict(prompt_lookup=2, use_cache=False), "\\(prompt_lookup\\) needs the KV cache"),
             (dict(prompt_lookup=2, max_new_tokens=39), "prompt 3 \\+ max_new_tokens 39 - 1 > context length 40")]
    for kw, said in cases:
        with pytest.raises(UserError, match=said):
            generate(target, idx, **{"max_new_tokens": 5, **kw})
    # the draft object itself, as draft=: checked as prompt_lookup= is, and proposing 10 tokens by default too
    for bad in (0, 2.0, True):
        with pytest.raises(UserError, match="prompt_lookup .* must be a positive integer"):
            generate(target, idx, 5, draft=PromptLookup(bad))
    from tritongpt.train import generate as gen

    idx, seen, real = repetitive(1, 5), [], gen.lookup_proposals
    monkeypatch.setattr(gen, "lookup_proposals", lambda idx, N, k: seen.append(k) or real(idx, N, k))
    for kw in (dict(prompt_lookup=2), dict(draft=PromptLookup(2))):
        generate(target, idx, 20, **kw)
    assert seen[0] == 10 and seen[len(seen) // 2:] == seen[:len(seen) // 2], seen


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tritongpt.model.config import get_config

    folder = tmp_path_factory.mktemp("lookup")
    torch.manual_seed(0)
    loud_attention(GPTModel(GPTConfig(**{**get_config("tiny").to_dict(), "n_layer": 2, "context_length": 64}))).save(
        folder / "model.safetensors")
    return folder


def test_the_generate_command_with_prompt_lookup(saved, capsys):
    from tritongpt import cli

    base = ["generate", "--weights", str(saved / "model.safetensors"), "--device", "cpu", "--prompt",
            "the cat sat on the mat. the cat sat on the mat. the cat", "--max-new-tokens", "12", "--temperature", "0"]
    assert cli.main(base) == 0
    want = capsys.readouterr().out
    for extra in (["--prompt-lookup", "2"], ["--prompt-lookup", "1", "--draft-tokens", "3"]):
        assert cli.main([*base, *extra]) == 0
        out = capsys.readouterr()
        assert out.out == want
        assert "prompt lookup decoding:" in out.err and "draft tokens accepted per forward of the model" in out.err
    assert cli.main([*base[:-2], "--temperature", "0.8", "--prompt-lookup", "2", "--num-samples", "2"]) == 0
    assert "prompt lookup decoding:" in capsys.readouterr().err


def test_the_generate_command_refuses_by_name(saved, capsys):
    from tritongpt import cli

    model = str(saved / "model.safetensors")
    base = ["generate", "--weights", model, "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "4"]
    cases = [(["--prompt-lookup", "2", "--draft", model], "--draft and --prompt-lookup are two drafts"),
             (["--prompt-lookup", "0"], "--prompt-lookup (the longest n-gram looked up) must be a positive integer"),
             (["--prompt-lookup", "2", "--draft-tokens", "0"], "--draft-tokens must be a positive integer"),
             (["--prompt-lookup", "2", "--num-beams", "2"], "--num-beams (beam search) does not take --prompt-lookup"),
             (["--prompt-lookup", "2", "--max-new-tokens", "80"],
              "speculative decoding (--prompt-lookup) keeps the text within the model's context: prompt 3 + "
              "--max-new-tokens 80 - 1 > context")]
    for extra, said in cases:
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert said in err, (extra, err)
