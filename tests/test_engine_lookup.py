"""Prompt lookup speculation in the batching engine (train/engine.py, Engine(prompt_lookup=N)): each request's
tokens are generate(prompt_lookup=N, num_draft_tokens=K)'s for it alone (greedy, and seeded samples with
penalties: the same generator use), requests of different lengths and budgets arriving at different steps, n > 1,
EOS and stop rules, slot and paged caches (preempting, and a pool so small that speculation is cut), int8, the
Triton path, prefix caching and CUDA-graph plain steps; and what decodes plainly or is refused."""
import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.train.engine import Cancelled, Engine
from tritongpt.train.generate import generate

from parity import loud_attention
from test_engine import SAMPLED, check, prompt, seeded, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
LOOKUP = dict(prompt_lookup=2, num_draft_tokens=4)


def looped(T, seed, period=5, n=1):
    """A prompt [n, T] repeating `period` random tokens: its n-grams recur, so rows propose from the start."""
    return prompt(period, seed=seed).repeat(1, -(-T // period))[:, :T].expand(n, T).clone()


def held(engine):
    """The engine, its step() checking after each step that every decoding row's cache holds its text but its last
    token (the fill a plain step and a speculative one both feed from)."""
    step = engine.step

    def checked():
        ran = step()
        for r in engine.running:
            if not r.todo:
                assert engine.cache.fill[r.slots].tolist() == [r.idx.size(1) - 1] * r.n
        return ran
    engine.step = checked
    return engine


def schedule_of(model):
    """A (greedy, its EOS the token that ends the run of one token it falls into), B (2 sampled rows, penalties),
    C arriving later (its stop rule likewise, mid-text), D (a 1-token prompt: nothing to prefill before its first
    speculative step). The tiny model's greedy text falls into repeats, whose proposals it accepts."""
    a, c = looped(12, 1), looped(6, 3, period=3)
    eos = int(generate(model, a, 9, **LOOKUP)[0, -1])
    last = int(generate(model, c, 12, **LOOKUP)[0, -1])
    assert eos not in generate(model, a, 8)[0, 12:].tolist() and last not in generate(model, c, 11)[0, 6:].tolist()
    return [(0, a, 16, dict(eos_id=eos)), (0, looped(7, 2, period=3, n=2), 9, dict(SAMPLED, seed=5)),
            (2, c, 14, dict(stop=lambda idx: idx[:, -1] == last)), (3, prompt(1, seed=4), 6, dict(temperature=1.0,
                                                                                               seed=9))]


@pytest.mark.parametrize("kw", [{}, dict(kv_pages=10, page_size=4), dict(kv_cache_dtype="int8"),
                                dict(kv_pages=40, page_size=4, prefix_caching=True)],
                         ids=["slots", "paged-preempting", "int8", "prefix-caching"])
def test_speculating_requests_get_generates_prompt_lookup_tokens(kw):
    model = loud_attention(tiny())
    engine = held(Engine(model, max_batch=4, **LOOKUP, **kw))
    schedule = schedule_of(model)
    check(model, schedule, engine, **LOOKUP, kv_cache_dtype=kw.get("kv_cache_dtype", "auto"))
    s = engine.stats
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]
    assert s["spec_decode_num_drafts"] > 0
    if "kv_pages" in kw:
        assert sorted(engine.cache.free) == list(range(kw["kv_pages"]))
        # (10 pages: speculating requests preempted and recomputed, 3 times; 11 preempted none. 8 and 9 cut B's
        # proposals short, so its samples are no longer generate()'s very tokens: README, prompt lookup)
        assert s["preemptions"] > 0 or kw.get("prefix_caching")
    if kw.get("prefix_caching"):  # A's blocks cached: the same prompt again reads them and draws the same
        h = engine.submit(schedule[0][1], 5)
        while engine.running or engine.waiting:
            engine.step()
        assert torch.equal(h.wait(), generate(model, schedule[0][1], 5, **LOOKUP))
        assert engine.stats["cached_prompt_tokens"] == 8


def test_a_speculating_request_takes_fewer_forwards_than_tokens():
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=2, **LOOKUP)
    h, steps = engine.submit(looped(10, 1), 20), 0
    while engine.running or engine.waiting:
        engine.step()
        steps += 1
    assert torch.equal(h.wait(), generate(model, looped(10, 1), 20, **LOOKUP))
    assert steps - 1 < 20  # (its first step a prefill only)


def test_a_pool_too_small_for_the_proposals_cuts_them_never_preempting():
    """Before each step a hog (slot 1's pages) leaves free only the page A's next token needs: A proposes only
    what its pages hold (fewer draft tokens than with room, none past a page's end), is never preempted, and still
    draws generate()'s greedy tokens."""
    model = loud_attention(tiny())
    a, new = looped(12, 1), 16
    drafted = []
    for hog in (True, False):
        engine = Engine(model, max_batch=2, kv_pages=12, page_size=4, **LOOKUP)
        h = engine.submit(a, new)
        while engine.running or engine.waiting:
            cache = engine.cache
            if hog and h.slots is not None:
                need = max(cache.pages_for(h.idx.size(1)) - len(cache.pages[h.slots[0]]), 0)
                cache.release(1)
                cache.reserve(1, (cache.num_free - need) * cache.page_size)
            engine.step()
        assert torch.equal(h.wait(), generate(model, a, new, **LOOKUP)) and engine.stats["preemptions"] == 0
        drafted.append(engine.stats["spec_decode_num_draft_tokens"])
    assert 0 < drafted[0] < drafted[1]


def test_the_triton_path_speculates_as_generate_does():
    model = loud_attention(tiny("triton", n_layer=1))
    schedule = [(0, looped(6, 1, period=3), 6, {}), (1, looped(4, 2, period=2), 3, dict(temperature=1.0, seed=3))]
    engine = Engine(model, max_batch=2, **LOOKUP)
    check(model, schedule, engine, **LOOKUP)
    assert engine.stats["spec_decode_num_accepted_tokens"] > 0


def test_cuda_graphs_replay_the_plain_steps_only():
    """A (no n-gram recurs at first: plain steps, replayed) beside B (speculating: eager forwards). The capture
    records fn itself (its replay calls it: the same buffers; test_engine's emulation traces, seconds a capture)."""
    model = loud_attention(tiny())
    log = []

    def capture(fn, device):
        log.append("capture")
        return lambda: (log.append("replay"), fn())[1]
    engine = held(Engine(model, max_batch=2, cuda_graph=True, capture=capture, **LOOKUP))
    schedule = [(0, torch.arange(6)[None], 10, {}), (1, looped(8, 2), 8, dict(SAMPLED, seed=1))]
    spec = []
    verify = engine._verify
    engine._verify = lambda *a: (spec.append(1), verify(*a))[1]
    check(model, schedule, engine, **LOOKUP)
    assert log.count("capture") == 2 and log.count("replay") > 0 and spec  # (buckets 1 and 2)
    assert log.count("replay") + len(spec) < 10 + 8  # (every decode step one or the other, fewer than tokens)


def test_logprobs_and_min_tokens_requests_decode_plainly():
    """generate refuses them with prompt_lookup: the engine draws theirs one token a step, as generate without it."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=3, **LOOKUP)
    a, b = looped(8, 1), looped(7, 2)
    got = []
    ha = engine.submit(a, 6, logprobs=1)
    hb = engine.submit(b, 6, eos_id=3, min_tokens=4)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(ha.wait(lambda nxt, lp: got.append(lp)), generate(model, a, 6)) and len(got) == 6
    assert torch.equal(hb.wait(), generate(model, b, 6, eos_id=3, min_tokens=4))
    assert engine.stats["spec_decode_num_drafts"] == 0


def test_what_the_engine_refuses_with_prompt_lookup():
    model = tiny()
    with pytest.raises(UserError, match="prompt_lookup .* must be a positive integer, got 0"):
        Engine(model, prompt_lookup=0)
    with pytest.raises(UserError, match="num_draft_tokens must be a positive integer .* got 2.5"):
        Engine(model, prompt_lookup=2, num_draft_tokens=2.5)


def test_prefix_caching_caches_only_pages_holding_their_ids_keys():
    """Two rows, prefix caching: row 0 draws its EOS inside a speculative step and is padded with it while row 1
    speculates on, its positions after the EOS written with its proposals' keys. Every block the index then holds
    for either row's ids is its ids' own keys (against a fresh forward of them), the drawn text's blocks included."""
    model = loud_attention(tiny())
    idx, eos = torch.cat([looped(9, 3, period=3), looped(9, 6, period=4)]), 83
    assert eos in generate(model, idx, 20, **LOOKUP)[0, 9:].tolist()
    engine = Engine(model, max_batch=2, kv_pages=24, page_size=4, prefix_caching=True, **LOOKUP)
    h = engine.submit(idx, 20, eos_id=eos)
    while engine.running or engine.waiting:
        engine.step()
    out = h.wait()
    assert torch.equal(out, generate(model, idx, 20, eos_id=eos, **LOOKUP))
    blocks = 0
    for row in out:
        pages = engine.cache.lookup(row[:-1])
        fresh = model.new_cache(1, 40)
        with torch.no_grad():
            model(row[None, :len(pages) * 4], fresh)
        for j, page in enumerate(pages):
            assert torch.allclose(engine.cache.k[:, page], fresh.k[:, 0, :, 4 * j:4 * j + 4], atol=1e-5), (row, j)
        blocks += len(pages)
    assert blocks > 2 * (9 // 4)  # (drawn tokens' blocks cached too, not only the prompts')


def test_rows_at_the_contexts_end_verify_in_forwards_of_their_own():
    """A (its text 3 positions short of the context, budget 3: 2 proposals) and B (short, 4 proposals: 1 + 4 wide)
    speculate in one step: A padded to B's width would write past the context, so the step runs two forwards; C (a
    1-token prompt, budget 1: nothing proposed, its one token drawn by B's forward) beside them; D arrives at the
    context's end. Each is generate()'s alone."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=4, **LOOKUP)
    widths, verify = [], engine._verify

    def spied(decoding, drafts):
        widths.append(sorted(1 + drafts[r][0].size(1) if r in drafts else 1 for r in decoding))
        return verify(decoding, drafts)
    engine._verify = spied
    schedule = [(0, looped(37, 1), 3, {}), (0, looped(6, 2), 9, {}), (0, prompt(1, seed=3), 1, {}),
                (1, looped(38, 4, period=3), 2, dict(SAMPLED, seed=2))]
    check(model, schedule, engine, **LOOKUP)
    assert [1, 3, 5] in widths  # (the step where A sat beside B)
    assert engine.stats["spec_decode_num_accepted_tokens"] > 0


def test_prefix_hits_chunks_and_a_cancel_leave_speculation_as_generates():
    """Prefix caching, chunked prefill (3 tokens a step), pages of 4: B (2 equal rows of 8 tokens: the 7 it prefills
    share 1 full block), C cancelled mid-speculation, then A's 9-token prompt again as 2 sampled rows (its first 8
    cached: nothing left to prefill before its first speculative step). Each is generate()'s; every page comes back."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=4, kv_pages=30, page_size=4, prefix_caching=True, max_prefill_tokens=3, **LOOKUP)
    a, b, c = looped(9, 5), looped(8, 6, n=2), looped(14, 7)
    handles = [engine.submit(a, 6), engine.submit(b, 10, eos_id=8), engine.submit(c, 12)]
    for _ in range(20):  # (C cancelled once it has drawn a few tokens, in more than one step)
        engine.step()
        if handles[2].idx.size(1) >= 14 + 3:
            break
    handles[2].cancel()
    engine.step()
    for _ in range(20):  # (A ended: its blocks cached)
        if handles[0] not in engine.running:
            break
        engine.step()
    assert handles[2] not in engine.running
    with pytest.raises(Cancelled):
        handles[2].wait()
    handles[2:] = [engine.submit(a.expand(2, -1), 6, **seeded(dict(SAMPLED, seed=4)))]
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(handles[0].wait(), generate(model, a, 6, **LOOKUP))
    assert torch.equal(handles[1].wait(), generate(model, b, 10, eos_id=8, **LOOKUP))
    assert torch.equal(handles[2].wait(), generate(model, a.expand(2, -1), 6, **seeded(dict(SAMPLED, seed=4)),
                                                   **LOOKUP))
    assert engine.stats["cached_prompt_tokens"] >= 8 and engine.stats["spec_decode_num_accepted_tokens"] > 0
    assert sorted(engine.cache.free) == list(range(30)) and engine.free == list(range(4))
