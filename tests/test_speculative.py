"""Speculative decoding (generate(draft=...), `tritongpt generate --draft`): greedy output is the model's own,
sampled output is distributed as the model's; the KV cache's crop; the refusals."""
import math

import pytest
import torch

from parity import loud_attention
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.generate import accept_drafts, generate, sampling_logits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():  # the tests' own forwards with a cache (generate() runs under it itself)
        yield


def tiny(seed, vocab=61, n_embd=32, n_layer=2, context=40, sharpen=1.0):
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=vocab, context_length=context, n_embd=n_embd, n_layer=n_layer,
                               n_head=2)).eval()
    with torch.no_grad():  # a random model's logits are near 0: scaled, its distributions are far from uniform
        model.final_norm.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module")
def target():
    return tiny(0)


@pytest.fixture(scope="module")
def loud():
    """The model with loud attention: a draft's tokens verified over the wrong keys or values (a crop that kept a
    stale one) would not be its own greedy tokens, where the plain model's tokens hardly read the cache."""
    return loud_attention(tiny(0))


@pytest.fixture(scope="module")
def other():
    return tiny(1, n_embd=16, n_layer=1)


def test_crop_then_feed_equals_a_fresh_prefill(target):
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    fresh = target(ids)
    cache = target.new_cache(2, 20)
    target(ids[:, :7], cache)
    target(torch.randint(0, 61, (2, 5)), cache)  # draft tokens, rejected
    cache.crop(7)
    assert cache.pos == 7
    assert torch.allclose(target(ids[:, 7:], cache), fresh[:, 7:], atol=1e-5)
    cache.crop(0)
    assert torch.allclose(target(ids, cache), fresh, atol=1e-5)
    for bad in (-1, 13, 2.0, None):
        with pytest.raises(UserError, match="cropped to 0..12"):
            cache.crop(bad)


def test_the_lm_heads_read_only_the_positions_the_step_uses(loud, other):
    """The draft's head reads one position a forward, the model's the step's K + 1 (its last text token and the
    K drafts), the prompt's prefill included: never B x T x V logits of a long prompt. The text is plain greedy's."""
    idx = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(5))
    want = generate(loud, idx, 9)
    seen = {"model": [], "draft": []}
    hooks = [m.out_head.register_forward_hook(lambda mod, a, out, who=who: seen[who].append(a[0].shape[1]))
             for m, who in ((loud, "model"), (other, "draft"))]
    try:
        out = generate(loud, idx, 9, draft=other, num_draft_tokens=3)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, want)
    assert seen["draft"] and set(seen["draft"]) == {1}
    assert seen["model"] and max(seen["model"]) <= 4 and seen["model"][0] == 4


@pytest.mark.parametrize("K", [1, 3, 4])
def test_greedy_is_the_models_own_output(loud, other, K):
    """Token for token, for several prompts and lengths (mid-block cuts among them), with the model as its own draft
    (every token kept: K accepted a forward) and with another model (some refused)."""
    g = torch.Generator().manual_seed(K)
    rejected = 0
    for T, new in ((1, 0), (3, 1), (5, 7), (4, 2 * (K + 1)), (6, 23)):
        idx = torch.randint(0, 61, (1, T), generator=g)
        want = generate(loud, idx, new)
        for draft in (loud, other):
            stats = {}
            assert torch.equal(generate(loud, idx, new, draft=draft, num_draft_tokens=K, stats=stats), want)
            if draft is loud and new == 2 * (K + 1):  # whole blocks: every draft token kept
                assert stats == dict(target_forwards=2, drafted=2 * K, accepted=2 * K, accepted_per_forward=K)
            if draft is other:
                rejected += stats["drafted"] - stats["accepted"]
    assert rejected > 0


def test_each_forward_runs_only_what_its_cache_lacks_and_the_draft_proposes_its_own_tokens(loud, other,
                                                                                          monkeypatch):
    """The crops keep exactly the text kept: the model runs the step's last token and its k draft tokens, no more
    (nor fewer: its output would differ), the draft each token once; and the draft's proposals are its own greedy
    continuation of the text so far (a stale key in its cache would change them, not the output)."""
    from tritongpt.train import generate as gen

    calls, steps = [], []
    real_feed, real_accept = gen._feed, gen.accept_drafts

    def feed(model, cache, ids, keep=1):
        calls.append((model is loud, cache.pos, ids.size(1)))
        return real_feed(model, cache, ids, keep)

    def accept(p_logits, q_logits, drafted, greedy, generator=None):
        n, nxt = real_accept(p_logits, q_logits, drafted, greedy, generator)
        steps.append((drafted[0].tolist(), int(n), int(nxt)))
        return n, nxt

    monkeypatch.setattr(gen, "_feed", feed)
    monkeypatch.setattr(gen, "accept_drafts", accept)
    idx = torch.tensor([[2, 7, 1, 8, 2]])
    out = generate(loud, idx, 25, draft=other, num_draft_tokens=3)
    monkeypatch.undo()
    assert torch.equal(out, generate(loud, idx, 25))
    text, last_all_kept = idx, False
    for drafted, n, nxt in steps:
        L = text.size(1)
        assert drafted == generate(other, text, len(drafted))[0, L:].tolist()
        target_calls = [c for c in calls if c[0]]
        draft_calls = [c for c in calls if not c[0]][:len(drafted)]
        calls = calls[len(drafted) + 1:]
        assert target_calls[0][1:] == ((0 if L == 5 else L - 1), L + len(drafted))
        for i, (_, pos, width) in enumerate(draft_calls):
            assert width == L + i and pos == (0 if L == 5 and i == 0 else L + i - 1 - (last_all_kept and i == 0))
        text = torch.cat([text, torch.tensor([drafted[:n] + [nxt]])], dim=1)
        last_all_kept = n == len(drafted)
    assert torch.equal(text, out)
    kept = [n == len(drafted) for drafted, n, _ in steps]
    assert any(kept[:-1]) and not all(kept)  # both crops, after all kept and after a refusal


@pytest.mark.parametrize("warp", [
    dict(temperature=0.8, top_k=30, top_p=0.95, min_p=0.01, repetition_penalty=1.3, frequency_penalty=0.5,
         presence_penalty=0.2, no_repeat_ngram_size=3),
    dict(temperature=0.9, typical_p=0.9, epsilon_cutoff=0.019, eta_cutoff=0.02, repetition_penalty=1.2),
    dict(temperature=0.9, top_n_sigma=2.0)], ids=["penalties", "cutoffs", "top_n_sigma"])
def test_the_verdict_reads_both_models_warped_distributions(target, other, monkeypatch, warp):
    """What accept_drafts is given, sampling with every setting: at each drafted position the model's and the
    draft's logits as sampling_logits makes them for sample_next there (penalties counted over the text before it)."""
    from tritongpt.train import generate as gen

    calls, real = [], gen.accept_drafts

    def accept(p_logits, q_logits, drafted, greedy, generator=None):
        n, nxt = real(p_logits, q_logits, drafted, greedy, generator)
        calls.append((p_logits, q_logits, drafted, int(n), nxt))
        return n, nxt

    monkeypatch.setattr(gen, "accept_drafts", accept)
    idx = torch.tensor([[7, 3, 7, 3, 1]])
    out = generate(target, idx, 20, generator=torch.Generator().manual_seed(0), draft=other, num_draft_tokens=3,
                   vocab_limit=50, **warp)
    text = idx
    for p_logits, q_logits, drafted, n, nxt in calls:
        L, k = text.size(1), drafted.size(1)
        full = torch.cat([text, drafted], dim=1)

        def warped(model, j):
            return sampling_logits(model(full[:, :L + j])[:, -1, :50], seen=full[:, :L + j], generated_from=5, **warp)

        torch.testing.assert_close(p_logits, torch.stack([warped(target, j) for j in range(k + 1)], dim=1))
        if k:  # (the last step may leave no room for a draft token)
            torch.testing.assert_close(q_logits, torch.stack([warped(other, j) for j in range(k)], dim=1))
        text = torch.cat([text, drafted[:, :n], nxt], dim=1)
    assert torch.equal(text, out) and len(calls) > 3


@pytest.mark.parametrize("draft_is_target", [True, False])
def test_greedy_stops_at_an_eos_inside_a_block(target, other, draft_is_target):
    idx = torch.tensor([[5, 9, 2]])
    plain = generate(target, idx, 12)[0, 3:].tolist()
    eos = plain[2]  # the third new token: inside the first block of 4 draft tokens
    want = generate(target, idx, 12, eos_id=eos)
    assert want.size(1) == 3 + plain.index(eos) + 1
    drawn, stats = [], {}
    got = generate(target, idx, 12, eos_id=eos, draft=target if draft_is_target else other, num_draft_tokens=4,
                   on_token=lambda t: drawn.append(int(t)), stats=stats)
    assert torch.equal(got, want) and drawn == want[0, 3:].tolist()
    if draft_is_target:  # all 4 proposed and accepted, the 3rd the EOS: the 4th, after it, is not counted as kept
        assert stats["drafted"] == 4 and stats["accepted"] == plain.index(eos) + 1 == 3


def test_greedy_with_penalties_ngram_ban_stop_and_vocab_limit(target, other):
    idx = torch.tensor([[7, 3, 7, 3, 1]])
    plain = generate(target, idx, 20)[0, 5:].tolist()
    # a stop string ending at the 7th new token (its first time): ends the text inside a block
    pair = plain[5:7]
    settings = [dict(repetition_penalty=1.5), dict(frequency_penalty=1.0, presence_penalty=0.5),
                dict(no_repeat_ngram_size=2), dict(vocab_limit=40),
                dict(stop=lambda rows: (rows[:, -2:] == torch.tensor(pair)).all(dim=1))]
    for kw in settings:
        want = generate(target, idx, 20, **kw)
        assert "stop" not in kw or want.size(1) < 25
        for K in (2, 5):
            assert torch.equal(generate(target, idx, 20, draft=other, num_draft_tokens=K, **kw), want), (kw, K)


def test_greedy_on_the_triton_path(device):
    """One case on the Triton kernels (the interpreter on a CPU): the model's output, and the crop's parity."""
    cfg = dict(vocab_size=61, context_length=24, n_embd=32, n_layer=1, n_head=2, kernels="attention")
    torch.manual_seed(0)
    target = GPTModel(GPTConfig(**cfg)).to(device).eval()
    torch.manual_seed(1)
    draft = GPTModel(GPTConfig(**{**cfg, "n_embd": 16, "n_head": 1})).to(device).eval()
    idx = torch.tensor([[4, 8, 15]], device=device)
    stats = {}
    want = generate(target, idx, 6)
    assert torch.equal(generate(target, idx, 6, draft=draft, num_draft_tokens=2, stats=stats), want)
    assert 0 < stats["accepted"] < stats["drafted"]  # some kept, some refused: both crops run
    ids = torch.randint(0, 61, (1, 8), device=device)
    cache = target.new_cache(1, 12)
    target(ids[:, :5], cache)
    target(ids[:, :3], cache)
    cache.crop(5)
    assert torch.allclose(target(ids[:, 5:], cache), target(ids)[:, 5:], atol=1e-4)


# -- sampling: the model's distribution ------------------------------------------------------------------------

V = 5
WARP = dict(temperature=0.9, top_k=4)


def tv_bound(cells: int, n: int, failure: float = 1e-6) -> float:
    """An L1 distance the empirical distribution of n draws over `cells` outcomes exceeds with probability at
    most `failure` (Bretagnolle-Huber-Carol: P(L1 >= x) <= 2^cells exp(-n x^2 / 2))."""
    return math.sqrt(2 * (cells * math.log(2) + math.log(1 / failure)) / n)


def warped_probs(model, rows):
    return torch.softmax(sampling_logits(model(rows)[:, -1], **WARP), dim=-1)


def exact_first_two(target, prompt):
    """[V, V]: the model's probability of each first two tokens after prompt [1, T], as sample_next draws."""
    p0 = warped_probs(target, prompt)[0]
    after = torch.cat([prompt.expand(V, -1), torch.arange(V).unsqueeze(1)], dim=1)
    return p0.unsqueeze(1) * warped_probs(target, after)


@pytest.fixture(scope="module")
def small():
    # far apart: the draft's tokens are refused often, and a wrong acceptance rule shows
    return tiny(2, vocab=V, n_embd=16, n_layer=1, context=8, sharpen=6.0), \
        tiny(5, vocab=V, n_embd=16, n_layer=1, context=8, sharpen=6.0)


@pytest.mark.parametrize("K", [1, 2])
def test_accept_drafts_draws_the_models_distribution(small, K):
    """40000 speculative steps at once: the draft's K tokens drawn from its warped distributions, the model's
    verdict; a row that has not two tokens yet draws its second from the model. The first two tokens' distribution
    is the model's to within what chance allows once in a million (K = 1: the second is the model's token after
    a kept draft token; K = 2: the verdict on the second draft token)."""
    target, draft = small
    prompt = torch.tensor([[1, 3, 0]])
    want = exact_first_two(target, prompt)
    N, g = 40000, torch.Generator().manual_seed(K)
    rows = prompt.expand(N, -1)
    q_logits = []
    for _ in range(K):
        w = sampling_logits(draft(rows)[:, -1], **WARP)
        q_logits.append(w)
        rows = torch.cat([rows, torch.multinomial(torch.softmax(w, -1), 1, generator=g)], dim=1)
    logits = target(rows)[:, -(K + 1):]
    p_logits = torch.stack([sampling_logits(logits[:, j], **WARP) for j in range(K + 1)], dim=1)
    n, nxt = accept_drafts(p_logits, torch.stack(q_logits, dim=1), rows[:, 3:], False, g)
    nxt = nxt.squeeze(1)
    assert 0.1 < (n < K).float().mean() < 0.9  # refusals, and acceptances, both common
    first = torch.where(n >= 1, rows[:, 3], nxt)
    # n = 0: the second token is the next step's; drawn here from the model's exact conditional
    after = torch.multinomial(want[first] / want[first].sum(-1, keepdim=True), 1, generator=g).squeeze(1)
    second = torch.where(n == 1, nxt, after) if K == 1 else \
        torch.where(n >= 2, rows[:, 4], torch.where(n == 1, nxt, after))
    seen = torch.bincount(first * V + second, minlength=V * V).double() / N
    l1 = (seen - want.flatten().double()).abs().sum().item()
    assert l1 < tv_bound(V * V, N), l1


@pytest.mark.parametrize("warp", [dict(temperature=1.1, typical_p=0.5), dict(temperature=1.3, epsilon_cutoff=0.1),
                                  dict(temperature=1.5, eta_cutoff=0.2), dict(temperature=1.2, top_n_sigma=1.5)],
                         ids=["typical", "epsilon", "eta", "top_n_sigma"])
def test_a_cut_leaves_the_first_token_the_models_warped_distribution(small, warp):
    """40000 speculative steps at once with a truncating warper on both models: the first token is distributed as
    the model's warped distribution (which the cut changes: tokens it keeps are refused when the draft drew them)."""
    target, draft = small
    prompt = torch.tensor([[1, 3, 0]])
    want = torch.softmax(sampling_logits(target(prompt)[:, -1], **warp), dim=-1)[0].double()
    assert 0 < int((want == 0).sum()) < V - 1  # the cut drops some tokens, not all but one
    N, g = 40000, torch.Generator().manual_seed(9)
    rows = prompt.expand(N, -1)
    q = sampling_logits(draft(rows)[:, -1], **warp)
    rows = torch.cat([rows, torch.multinomial(torch.softmax(q, -1), 1, generator=g)], dim=1)
    logits = target(rows)[:, -2:]
    p_logits = torch.stack([sampling_logits(logits[:, j], **warp) for j in range(2)], dim=1)
    n, nxt = accept_drafts(p_logits, q.unsqueeze(1), rows[:, 3:], False, g)
    assert 0.05 < (n < 1).float().mean() < 0.95  # refusals, and acceptances, both common
    first = torch.where(n >= 1, rows[:, 3], nxt.squeeze(1))
    l1 = (torch.bincount(first, minlength=V).double() / N - want).abs().sum().item()
    assert l1 < tv_bound(V, N), l1


def test_generate_with_a_draft_samples_the_models_distribution(small):
    """The whole path, generate() itself: fewer draws (one a call), a looser bound of the same certainty (what
    generate() hands accept_drafts is checked exactly above)."""
    target, draft = small
    prompt = torch.tensor([[1, 3, 0]])
    want = exact_first_two(target, prompt).flatten().double()
    N, g = 400, torch.Generator().manual_seed(1)
    counts = torch.zeros(V * V, dtype=torch.double)
    for _ in range(N):
        out = generate(target, prompt, 2, generator=g, draft=draft, num_draft_tokens=3, **WARP)[0, 3:]
        counts[out[0] * V + out[1]] += 1
    l1 = (counts / N - want).abs().sum().item()
    assert l1 < tv_bound(V * V, N), l1


# -- refusals --------------------------------------------------------------------------------------------------

def test_refusals(target, other, loud):
    idx = torch.tensor([[1, 2, 3]])
    cases = [(dict(draft=other, num_draft_tokens=0), "num_draft_tokens must be a positive integer"),
             (dict(draft=other, num_draft_tokens=2.0), "num_draft_tokens must be a positive integer"),
             (dict(draft=other, use_cache=False), "needs the KV cache"),
             (dict(draft=tiny(3, vocab=60)), "draft model's vocabulary has 60 tokens, the model's 61"),
             (dict(draft=other, max_new_tokens=39), "prompt 3 \\+ max_new_tokens 39 - 1 > context length 40")]
    for kw, said in cases:
        kw = {"max_new_tokens": 5, **kw}
        with pytest.raises(UserError, match=said):
            generate(target, idx, **kw)
    # the last token is drawn from the logits at position 40: the text may end one past the context
    assert torch.equal(generate(loud, idx, 38, draft=other), generate(loud, idx, 38))


# -- the command ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model of the embedded tokenizer's vocabulary and a smaller draft of it, saved as files."""
    from tritongpt.model.config import get_config

    folder = tmp_path_factory.mktemp("speculative")
    cfg = get_config("tiny")
    torch.manual_seed(0)
    loud_attention(GPTModel(GPTConfig(**{**cfg.to_dict(), "n_layer": 2, "context_length": 64}))).save(
        folder / "model.safetensors")
    torch.manual_seed(1)
    GPTModel(GPTConfig(vocab_size=cfg.vocab_size, context_length=64, n_embd=32, n_layer=1, n_head=2)).save(
        folder / "draft.safetensors")
    return folder


def test_the_generate_command_with_a_draft(saved, capsys):
    from tritongpt import cli

    base = ["generate", "--weights", str(saved / "model.safetensors"), "--prompt", "The cat", "--device", "cpu",
            "--max-new-tokens", "12", "--temperature", "0"]
    assert cli.main(base) == 0
    want = capsys.readouterr().out
    for extra in ([], ["--draft-tokens", "2"]):
        assert cli.main([*base, "--draft", str(saved / "draft.safetensors"), *extra]) == 0
        out = capsys.readouterr()
        assert out.out == want
        assert "speculative decoding:" in out.err and "draft tokens accepted per forward of the model" in out.err
    # the model as its own draft: every proposed token kept
    assert cli.main([*base, "--draft", str(saved / "model.safetensors"), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == want and "3.00 draft tokens accepted per forward of the model (9 of 9 proposed, 3 forwards)" \
        in out.err
    assert cli.main([*base[:-2], "--temperature", "0.8", "--draft", str(saved / "draft.safetensors")]) == 0


def test_the_generate_command_refuses_by_name(saved, tmp_path, capsys):
    from tritongpt import cli
    from tritongpt.train.tokenizer import BPETokenizer

    base = ["generate", "--weights", str(saved / "model.safetensors"), "--prompt", "The cat", "--device", "cpu",
            "--max-new-tokens", "4"]
    draft = str(saved / "draft.safetensors")
    torch.manual_seed(0)
    GPTModel(GPTConfig(vocab_size=300, context_length=64, n_embd=32, n_layer=1, n_head=2)).save(
        tmp_path / "small.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes((saved / "draft.safetensors").read_bytes())
    BPETokenizer.train(" ".join(f"word{i} other{i * 7}" for i in range(400)), 300).save(run / "tokenizer.json")
    cases = [(["--draft-tokens", "2"], "--draft-tokens is how many tokens the --draft model proposes"),
             (["--draft", draft, "--draft-tokens", "0"], "--draft-tokens must be a positive integer"),
             (["--draft", str(tmp_path / "small.safetensors")], "has a vocabulary of 300 tokens, the model 4096"),
             (["--draft", str(run / "model.safetensors")], "is not the model's: its ids mean other text"),
             (["--draft", draft, "--max-new-tokens", "80"], "prompt 3 \\+ --max-new-tokens 80 - 1 > context")]
    for extra, said in cases:
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert said.replace("\\", "") in err, (extra, err)


def test_chat_with_a_draft_answers_as_without_it(saved, monkeypatch, capsys):
    """chat --draft: each greedy answer is the model's own, and the acceptance over the conversation is noted once
    at its end (the model as its own draft keeps every proposed token); --draft-tokens alone is refused."""
    import io

    from tritongpt import cli

    base = ["chat", "--weights", str(saved / "model.safetensors"), "--device", "cpu", "--template", "completion",
            "--max-new-tokens", "7", "--temperature", "0"]
    answers = []
    for extra in ([], ["--draft", str(saved / "draft.safetensors")],
                  ["--draft", str(saved / "model.safetensors"), "--draft-tokens", "2"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("The cat\nA dog\n"))
        assert cli.main([*base, *extra]) == 0
        out = capsys.readouterr()
        answers.append(out.out)
        assert out.err.count("speculative decoding:") == (1 if extra else 0), out.err
        if "--draft-tokens" in extra:
            # 7 tokens a reply: two steps of 2 kept + the model's own, then the 7th alone (no room to draft);
            # summed over both replies
            assert "1.33 draft tokens accepted per forward of the model (8 of 8 proposed, 6 forwards)" in out.err
    assert answers[0] == answers[1] == answers[2] and answers[0].strip()
    assert cli.main([*base, "--draft-tokens", "2"]) == 2
    assert "--draft-tokens is how many tokens the --draft model proposes a step: pass --draft" in \
        capsys.readouterr().err


def test_chat_refuses_a_bad_draft_tokens_by_its_flag_before_any_message(saved, monkeypatch, capsys):
    """chat --draft-tokens 0 (or negative): refused up front naming --draft-tokens, as generate does; it was
    generate()'s "num_draft_tokens must be ..." only at the first reply, after a message was typed."""
    import io

    from tritongpt import cli

    read = []
    monkeypatch.setattr("sys.stdin", type("In", (io.StringIO,), dict(
        readline=lambda self: read.append(1) or io.StringIO.readline(self)))("The cat\n"))
    for k in ("0", "-1"):
        assert cli.main(["chat", "--weights", str(saved / "model.safetensors"), "--device", "cpu", "--template",
                         "completion", "--max-new-tokens", "3", "--draft", str(saved / "draft.safetensors"),
                         "--draft-tokens", k]) == 2
        err = capsys.readouterr().err
        assert f"--draft-tokens must be a positive integer, got {k}" in err, err
    assert not read


class FixedOrder(torch.nn.Module):
    """A model stand-in over 3 ids whose logits always rank `order` first to last, with a cache that only counts."""

    def __init__(self, order):
        super().__init__()
        self.config = type("Config", (), dict(context_length=64, rope_scaling=None, vocab_size=3))()
        self.scores = torch.zeros(3)
        for rank, i in enumerate(order):
            self.scores[i] = 3.0 - rank

    def new_cache(self, batch, length):
        return type("Cache", (), dict(pos=0, crop=lambda c, n: setattr(c, "pos", n),
                                      reset=lambda c: setattr(c, "pos", 0)))()

    def forward(self, idx, cache=None):
        if cache is not None:
            cache.pos += idx.size(1)
        return self.scores.expand(idx.size(0), idx.size(1), 3).clone()


def test_a_draft_path_the_ngram_ban_leaves_nothing_does_not_stop_generation():
    """no_repeat_ngram_size 2 over 3 ids: the draft's own path (0, 0, 2, 0 after [0, 1]) reaches a token whose every
    continuation repeats a bigram, a path the model never takes; drafting there raised "bans every token" where
    plain decoding goes on. The draft now proposes unbanned, the model refuses it, and the text is plain decoding's."""
    target, draft = FixedOrder([1, 2, 0]), FixedOrder([0, 1, 2])
    idx = torch.tensor([[0, 1]])
    want = generate(target, idx, 6, no_repeat_ngram_size=2)
    assert want[0, 2:].tolist() == [1, 2, 1, 0, 2, 2]
    got = generate(target, idx, 6, no_repeat_ngram_size=2, draft=draft, num_draft_tokens=5)
    assert torch.equal(got, want)
    # where the kept text itself leaves nothing (n = 1 over 3 ids: the 3rd new token), the error is plain decoding's
    for d in (None, draft, target):
        with pytest.raises(UserError, match="--no-repeat-ngram-size 1 bans every token"):
            generate(target, torch.tensor([[1]]), 3, no_repeat_ngram_size=1, draft=d, num_draft_tokens=2)


# -- batches: several rows, one verification forward over all of them -----------------------------------------

def alone(target, idx, new, pad=None, **kw):
    """Each row of idx generated by itself, plain decoding: a list of rows (padded with pad to the longest)."""
    rows = [generate(target, row[None], new, **kw)[0].tolist() for row in idx]
    width = max(map(len, rows))
    return [r + [pad] * (width - len(r)) for r in rows] if pad is not None else rows


@pytest.mark.parametrize("B", [2, 3])
@pytest.mark.parametrize("K", [1, 3])
def test_batched_greedy_is_each_rows_own_output(target, other, B, K):
    """B rows with different prompts, each greedy row the model's own output alone: ended by an EOS at different
    steps (padded with it, as generate's batches), by a stop string, or under every penalty and the n-gram ban."""
    g = torch.Generator().manual_seed(10 * B + K)
    idx = torch.randint(0, 61, (B, 5), generator=g)
    new = 16
    plain = [r[5:] for r in alone(target, idx, new)]
    eos = plain[0][2]  # row 0 ends by its 3rd new token, the others later or not at all
    ends = [r.index(eos) if eos in r else new for r in plain]
    assert ends[0] <= 2 and max(ends) > 4, ends
    want = torch.tensor(alone(target, idx, new, pad=eos, eos_id=eos))
    for draft in (other, target):
        drawn, stats = [], {}
        got = generate(target, idx, new, eos_id=eos, draft=draft, num_draft_tokens=K, stats=stats,
                       on_token=drawn.append)
        assert torch.equal(got, want), (draft is target, got, want)
        assert torch.equal(torch.cat(drawn, dim=1), got[:, 5:])  # streamed a position at a time, all rows
        if draft is target:  # every draft token kept: K + 1 tokens a forward
            assert stats["target_forwards"] == -(-(got.size(1) - 5) // (K + 1))
        else:
            assert stats["accepted"] < stats["drafted"]
    # a stop string row 1 draws (its 5th and 6th new tokens): that row ends there; without an EOS a finished
    # row's tokens past its end are padding nobody reads (the command cuts the text at the stop)
    pair = torch.tensor(plain[1][4:6])

    def stop(rows):
        return (rows[:, -2:] == pair).all(dim=1)

    want = alone(target, idx, new, stop=stop)
    assert min(map(len, want)) <= 11 < max(map(len, want))  # rows stop at different steps
    got = generate(target, idx, new, stop=stop, draft=other, num_draft_tokens=K)
    assert got.size(1) == max(map(len, want))
    for row, w in zip(got.tolist(), want):
        assert row[:len(w)] == w
    warp = dict(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.3, no_repeat_ngram_size=2,
                vocab_limit=50)
    got = generate(target, idx, new, draft=other, num_draft_tokens=K, **warp)
    assert got.tolist() == alone(target, idx, new, **warp)


def test_batched_sampling_draws_each_rows_distribution(small, monkeypatch):
    """Four rows of different prompts share each step, so the fewest draft tokens one row accepts is what all keep
    (rows that accepted more keep an accepted draft token at that place): each row's first two tokens are still
    distributed as the model's, for its own prompt, to within what chance allows once in a million."""
    from tritongpt.train import generate as gen

    target, draft = small
    prompts = torch.tensor([[1, 3, 0], [4, 2, 2], [0, 4, 1], [2, 2, 3]])
    events, real = [], gen.keep_common

    def keep(n, nxt, drafted, done):
        m, kept = real(n, nxt, drafted, done)
        events.append((m, drafted.size(1), n.tolist()))
        return m, kept

    monkeypatch.setattr(gen, "keep_common", keep)
    N, g = 600, torch.Generator().manual_seed(4)
    counts = torch.zeros(4, V * V, dtype=torch.double)
    for _ in range(N):
        # 3 new tokens, 2 drafted: a step of two draft tokens, then what is left
        out = generate(target, prompts, 3, generator=g, draft=draft, num_draft_tokens=2, **WARP)[:, 3:]
        counts[torch.arange(4), out[:, 0] * V + out[:, 1]] += 1
    # the rule's every branch, often: a row past the common count, a common count of 0 and of 1
    assert sum(sum(x > m for x in n) for m, _, n in events) > N
    assert sum(m == 0 for m, k, _ in events if k) > N / 4 and sum(m == 1 for m, k, _ in events if k) > N / 10
    for r in range(4):
        want = exact_first_two(target, prompts[r:r + 1]).flatten().double()
        l1 = (counts[r] / N - want).abs().sum().item()
        assert l1 < tv_bound(V * V, N), (r, l1)


def test_each_step_runs_one_verification_forward_over_all_rows(target, other, monkeypatch):
    """Per step: k draft forwards and one model forward, each over all B rows; the counts in stats are those."""
    from tritongpt.train import generate as gen

    calls, real = [], gen._feed

    def feed(model, cache, ids, keep=1):
        calls.append((model is target, ids.size(0), ids.size(1) - cache.pos))
        return real(model, cache, ids, keep)

    monkeypatch.setattr(gen, "_feed", feed)
    idx = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(7))
    stats = {}
    out = generate(target, idx, 20, draft=other, num_draft_tokens=3, stats=stats)
    monkeypatch.undo()
    assert out.tolist() == alone(target, idx, 20)
    assert all(rows == 3 for _, rows, _ in calls)
    verify = [i for i, c in enumerate(calls) if c[0]]
    assert len(verify) == stats["target_forwards"] and stats["target_forwards"] < 20
    # between two verifications, the draft's k forwards: the model then runs the step's last token and those k
    # (the first step: the prompt as well)
    before = -1
    for i in verify:
        k = i - before - 1
        assert all(not c[0] for c in calls[before + 1:i]) and 0 <= k <= 3
        assert calls[i][2] == (k + 4 if before == -1 else k + 1)
        before = i
    assert stats["drafted"] == 3 * sum(verify[i] - (verify[i - 1] if i else -1) - 1 for i in range(len(verify)))


class Blind(torch.nn.Module):
    """The model as a draft for every row but `row`, where its proposals are the model's least likely tokens."""

    def __init__(self, model, row):
        super().__init__()
        self.model, self.row, self.config = model, row, model.config

    def new_cache(self, batch, length):
        return self.model.new_cache(batch, length)

    def forward(self, idx, cache=None):
        logits = self.model(idx, cache).clone()
        logits[self.row] = -logits[self.row]
        return logits


def test_a_finished_row_does_not_hold_the_others_back(target):
    """Row 0's draft tokens are always refused; it ends (EOS) at its first new token, and after that the other
    rows keep every draft token: K + 1 tokens a forward, not the finished row's 1."""
    from tritongpt.train.generate import keep_common

    K = 3
    idx = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(8))
    new = 1 + 2 * (K + 1)
    eos = alone(target, idx[:1], 1)[0][-1]
    assert all(eos not in r[4:] for r in alone(target, idx[1:], new))
    stats = {}
    got = generate(target, idx, new, eos_id=eos, draft=Blind(target, 0), num_draft_tokens=K, stats=stats)
    assert got.tolist() == alone(target, idx, new, pad=eos, eos_id=eos)
    # the first step keeps 1 token (row 0 refused its first draft token; rows 1 and 2 keep their first, accepted,
    # as the step's own token), then two of K + 1, rows 1 and 2 alone live
    assert stats == dict(target_forwards=3, drafted=3 * K + 2 * 2 * K, accepted=2 * 2 * K,
                         accepted_per_forward=4 * K / 7)
    # the rule itself: the fewest of the live rows; past it a row's accepted draft token, at it its own token
    n, nxt = torch.tensor([0, 3, 1, 2]), torch.tensor([[50], [51], [52], [53]])
    drafted = torch.arange(16).view(4, 4)
    m, kept = keep_common(n, nxt, drafted, torch.tensor([True, False, False, False]))
    assert m == 1 and kept.tolist() == [[0, 1], [4, 5], [8, 52], [12, 13]]
    m, kept = keep_common(torch.tensor([4, 4, 0, 4]), nxt, drafted, torch.tensor([False, False, True, False]))
    assert m == 4 and kept.tolist() == [[0, 1, 2, 3, 50], [4, 5, 6, 7, 51], [8, 9, 10, 11, 52], [12, 13, 14, 15, 53]]


def test_the_generate_command_with_a_draft_and_samples(saved, capsys):
    """generate --draft --num-samples: greedy, every sample the model's own text; the acceptance noted a forward
    and sample; sampled, the samples differ."""
    from tritongpt import cli

    base = ["generate", "--weights", str(saved / "model.safetensors"), "--prompt", "The cat", "--device", "cpu",
            "--max-new-tokens", "12", "--num-samples", "2"]
    assert cli.main([*base, "--temperature", "0"]) == 0
    want = capsys.readouterr().out
    assert cli.main([*base, "--temperature", "0", "--draft", str(saved / "draft.safetensors")]) == 0
    out = capsys.readouterr()
    assert out.out == want
    assert "draft tokens kept per forward of the model and sample, the fewest a sample accepted; each forward " \
        "gave a sample one more (" in out.err and "over 2 samples" in out.err
    # the model as its own draft: every proposed token kept, K a forward and sample
    assert cli.main([*base, "--temperature", "0", "--draft", str(saved / "model.safetensors"),
                     "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == want and "3.00 draft tokens kept per forward of the model and sample, the fewest a sample " \
        "accepted; each forward gave a sample one more (18 of 18 proposed over 2 samples, 3 forwards)" in out.err
    assert cli.main([*base, "--temperature", "1.0", "--seed", "3", "--draft", str(saved / "draft.safetensors")]) == 0
    texts = capsys.readouterr().out.split("\n---------------\n")
    assert len(texts) == 2 and texts[0] != texts[1]


def test_a_finished_row_the_ngram_ban_leaves_nothing_is_padding_not_an_error():
    """As generate's batches: row 0 ends (EOS 2) having seen every id, so no_repeat_ngram_size 1 bans all its next
    tokens; it is padding now, not an error, while row 1 draws on."""
    target = FixedOrder([1, 2, 0])
    idx = torch.tensor([[0, 1], [0, 0]])
    want = generate(target, idx, 3, eos_id=2, no_repeat_ngram_size=1)
    assert want.tolist() == [[0, 1, 2, 2], [0, 0, 1, 2]]
    for draft in (target, FixedOrder([0, 1, 2])):
        got = generate(target, idx, 3, eos_id=2, no_repeat_ngram_size=1, draft=draft, num_draft_tokens=2)
        assert torch.equal(got, want)


def test_batched_rows_up_to_the_context_limit(target, other):
    """Several rows run to the last token the context allows (prompt + new - 1 = the context): each row is the
    model's own greedy text alone, with a draft of the model's context and with one of a shorter context, whose
    proposals stop once the text outgrows it (the model then runs a token a step); the caches never overflow."""
    idx = torch.randint(0, 61, (3, 4), generator=torch.Generator().manual_seed(11))
    new = 40 - 4 + 1
    want = alone(target, idx, new)
    short = tiny(4, n_embd=16, n_layer=1, context=12)
    for draft, K in ((other, 3), (short, 4), (target, 5)):
        stats = {}
        got = generate(target, idx, new, draft=draft, num_draft_tokens=K, stats=stats)
        assert got.tolist() == want, (K, got, want)
        if draft is short:  # proposals only while the draft runs within its context (L + k - 1 <= 12): from
            # L = 13 on, one token a forward, 28 forwards to the 41st position
            assert 0 < stats["drafted"] <= 3 * 4 * 9 and stats["target_forwards"] >= 41 - 13
        if draft is target:  # every proposal kept: K + 1 tokens a forward, the last step what is left
            assert stats["target_forwards"] == -(-new // (K + 1)) and stats["accepted"] == stats["drafted"]
