"""Continuous batching (train/engine.py): requests of different prompts, budgets and n, arriving while others run
and waiting for slots, each get generate()'s tokens for that request alone (greedy, and seeded samples with its
penalties), on both paths and with an int8 cache; EOS and stop rules end a request and free its slots for the
next in line; and `serve --max-batch` over a real socket."""
import threading
import time

import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.engine import PREFILL_PAD, Cancelled, Chunk, Engine
from tritongpt.train.generate import generate

from parity import assert_close_rel, loud_attention

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 97
SAMPLED = dict(temperature=0.9, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=-0.3)


def tiny(kernels="reference", n_layer=2, **extra):
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=VOCAB, context_length=40, n_embd=32, n_layer=n_layer, n_head=2,
                              tie_weights=False, kernels=kernels, **extra)).eval()


def prompt(T, n=1, seed=0):
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))
    return ids.expand(n, T).clone()


def seeded(kw):
    """A request's settings, its "seed" a generator of its own."""
    seed = kw.get("seed")
    return {**{k: v for k, v in kw.items() if k != "seed"},
            "generator": None if seed is None else torch.Generator().manual_seed(seed)}


def run(engine, schedule):
    """schedule: [(step it arrives at, idx, max_new_tokens, settings)]; the engine stepped until all end. ->
    [(handle, the step it was admitted at)]."""
    handles, admitted, step = [None] * len(schedule), [None] * len(schedule), 0
    while None in handles or engine.running or engine.waiting:
        for i, (at, idx, new, kw) in enumerate(schedule):
            if at == step:
                handles[i] = engine.submit(idx, new, **seeded(kw))
        engine.step()
        for i, h in enumerate(handles):  # slots held, or tokens drawn already (a request that ended at once)
            if h is not None and admitted[i] is None and (h.slots is not None or not h.queue.empty()):
                admitted[i] = step
        step += 1
    return list(zip(handles, admitted))


def alone(model, idx, new, kw, **extra):
    return generate(model, idx, new, **seeded(kw), **extra)


def check(model, schedule, engine, reference_alone=False, **extra):
    """Each request of schedule run by the engine gets generate()'s tokens alone; with reference_alone those on the
    reference path of the same weights (an interpreted engine's: ~5 ms a Triton program, the engine's forwards
    what runs the kernels under test)."""
    out = run(engine, schedule)
    if reference_alone:
        model.set_kernels("reference")
    for (handle, _), (_, idx, new, kw) in zip(out, schedule):
        assert torch.equal(handle.wait(), alone(model, idx, new, kw, **extra))
    assert engine.free == list(range(engine.max_batch)) and not engine.running and not engine.waiting
    return [at for _, at in out]


def test_requests_arriving_and_waiting_get_generates_tokens_each(one_thread):
    """max_batch 4: A and B (1 + 2 rows) run; C (2 rows) arrives at step 1 and waits; D (1 row) at step 2 waits
    behind C though a slot is free (FIFO); greedy and seeded samples with penalties, each generate()'s alone."""
    model = tiny()
    schedule = [(0, prompt(5, seed=1), 9, {}),
                (0, prompt(11, 2, seed=2), 4, dict(SAMPLED, seed=5)),
                (1, prompt(3, 2, seed=3), 6, {}),
                (2, prompt(7, seed=4), 5, dict(temperature=1.0, top_k=20, min_p=0.05, seed=9)),
                (3, prompt(4, 3, seed=6), 3, dict(SAMPLED, seed=11))]
    admitted = check(model, schedule, Engine(model, max_batch=4))
    # B ends at step 3 (4 tokens): C takes its 2 slots at step 4, D the one left beside A; E (3 rows, at step 3)
    # waits past A's and D's end (steps 8: 2 slots free) for C's (step 9)
    assert admitted == [0, 0, 4, 4, 10]


def test_the_triton_path_batches_as_generate_does(one_thread, monkeypatch):
    """And its sampled request draws with the Triton sampling kernel at each of its 3 tokens, in the engine (the
    step's batched draw: the per-row launch) and in generate() alone (one setting a launch); both paths draw the same
    tokens, so only a spy on the kernel sees which one ran."""
    import tritongpt.kernels.sampling as ks
    launches, real, rows = [], ks._launch, ks._launch_rows
    monkeypatch.setattr(ks, "_launch", lambda *a: launches.append(("alone", *a[0].shape)) or real(*a))
    monkeypatch.setattr(ks, "_launch_rows", lambda *a: launches.append(("rows", *a[0].shape)) or rows(*a))
    model = tiny("triton", n_layer=1)
    schedule = [(0, prompt(5, seed=1), 3, {}), (1, prompt(9, 2, seed=2), 3, dict(SAMPLED, seed=5))]
    check(model, schedule, Engine(model, max_batch=3))
    assert sorted(launches) == [("alone", 2, VOCAB)] * 3 + [("rows", 2, VOCAB)] * 3, launches


def test_an_int8_cache_batches_as_generate_with_it(one_thread):
    model = tiny(n_kv_head=1)
    schedule = [(0, prompt(6, seed=1), 5, {}), (1, prompt(4, 2, seed=2), 6, dict(repetition_penalty=1.2)),
                (2, prompt(9, seed=3), 4, {})]
    engine = Engine(model, max_batch=3, kv_cache_dtype="int8")
    assert engine.cache.quantized
    check(model, schedule, engine, kv_cache_dtype="int8")


@pytest.mark.parametrize("paged", [False, True], ids=["slots", "pages"])
def test_an_int8_cache_holds_the_levels_generate_writes_within_one(one_thread, paged):
    """The engine's int8 cache itself, not only its tokens (a tiny model's greedy tokens survive many wrong keys):
    each request's rows, prefilled in chunks of 4 and decoded batched with the others, hold at their end the int8
    levels and scales a one-request generate() writes, within one level and 1e-5 of a scale. Not bitwise: torch's
    CPU matmul rounds a product of 1, of 2-3 and of 4+ rows each its own way, and the engine's forwards have other
    rows than generate's (a decode of the rows up to the last busy slot, a prompt in chunks of 4), so a key's
    floats differ in their last bits: a scale moves by an ulp and, where an element sits at a level's rounding
    boundary, it rounds to the next level. A wrong span for a scale (a batch's rows sharing one), a position
    written to the wrong row or page, a scale not copied with its row: many levels or whole scales off."""
    model = loud_attention(tiny(n_kv_head=1))
    schedule = [(0, prompt(7, seed=1), 6, {}), (1, prompt(9, 2, seed=2), 5, dict(SAMPLED, seed=5)),
                (2, prompt(5, seed=3), 7, {})]
    extra = dict(kv_pages=16, page_size=4) if paged else {}
    engine = Engine(model, max_batch=4, kv_cache_dtype="int8", max_prefill_tokens=4, **extra)
    held, let_go = {}, engine._let_go

    def snapshot(r, cache):  # its rows as they are when it lets them go (a free slot row is written again)
        L, slots = r.idx.size(1) - 1, r.slots  # (the positions fed: the last token never is)
        pages = [engine.cache.pages[s] for s in slots] if paged else [None] * len(slots)
        held[id(r)] = [torch.stack([row_of(buf, s, p, L) for s, p in zip(slots, pages)], 1)
                       for buf in (engine.cache.k, engine.cache.v, engine.cache.k_scale, engine.cache.v_scale)]
        let_go(r, cache)

    engine._let_go = snapshot
    out = run(engine, schedule)
    for (h, _), (_, idx, new, kw) in zip(out, schedule):
        ids = h.wait()
        assert torch.equal(ids, alone(model, idx, new, kw))
        L, T = ids.size(1) - 1, idx.size(1)
        own = model.new_cache(ids.size(0), L, kv_dtype="int8")  # generate's: the prompt whole, then a token a step
        with torch.no_grad():
            model(ids[:, :T], own)
            for t in range(T, L):
                model(ids[:, t:t + 1], own)
        k, v, ks, vs = held[id(h)]
        for got, want in ((k, own.k), (v, own.v)):
            assert (got.int() - want.int()).abs().max() <= 1
            assert (got != want).float().mean() < 0.01  # (measured: 6 elements in 977,664, 60 random schedules)
        for got, want in ((ks, own.k_scale), (vs, own.v_scale)):
            assert ((got - want).abs() / want).max() < 1e-5


def row_of(buf, slot, pages, L):
    """A cache buffer's row `slot`, its first L positions [n_layer, kv_heads, L(, D)]: a slot row, or read through
    a paged cache's pages in order."""
    if pages is None:
        return buf[:, slot, :, :L].clone()
    return torch.cat(buf[:, pages].unbind(1), 2)[:, :, :L].clone()


def test_a_paged_cache_admits_by_pages_and_batches_as_generate(one_thread):
    """kv_pages, preemption off: a request takes n x pages_for(prompt + budget - 1) pages at admission and waits,
    FIFO, while too few are free though slots are; every request still generate()'s alone; every page back at the
    end."""
    model = tiny()
    schedule = [(0, prompt(13, seed=1), 9, {}),                        # 21 positions: 6 pages of 4
                (0, prompt(5, 2, seed=2), 4, dict(SAMPLED, seed=5)),   # 2 x 2 pages
                (1, prompt(9, seed=3), 6, {}),                         # 4 pages: waits for B's
                (1, prompt(2, seed=4), 3, dict(temperature=1.0, seed=9))]  # 1 page: waits behind C (FIFO)
    engine = Engine(model, max_batch=4, kv_pages=12, page_size=4, preemption=False)
    assert engine.pages_for(13, 9) == 6 and engine.pages_for(5, 4) == 2
    admitted = check(model, schedule, engine)
    assert admitted == [0, 0, 4, 4]  # B ends at step 3 (4 tokens): its 4 pages and C's wait over
    assert sorted(engine.cache.free) == list(range(12)) and engine.cache.pages == [[]] * 4
    with pytest.raises(UserError, match="the request needs 14 KV pages of 4 positions .* more than the cache's 12"):
        engine.submit(prompt(20, 2), 8)


def test_a_free_row_between_busy_ones_never_writes_into_a_held_page(one_thread):
    """B (slot 1) ends first: the steps after it run rows 0..2, slot 1 among them with no request; its writes go to
    the scratch page, so A's full first page stays as it was and A and C keep generate()'s tokens."""
    model = tiny()
    schedule = [(0, prompt(5, seed=1), 10, {}), (0, prompt(3, seed=2), 2, {}), (0, prompt(6, seed=3), 10, {})]
    engine = Engine(model, max_batch=3, kv_pages=12, page_size=4)
    handles = [engine.submit(idx, new, **seeded(kw)) for _, idx, new, kw in schedule]
    while handles[1].slots is not None or not engine.running:
        engine.step()
    first = engine.cache.pages[0][0]
    before = engine.cache.k[:, first].clone()
    while engine.running:
        engine.step()
    assert torch.equal(engine.cache.k[:, first], before)
    for h, (_, idx, new, kw) in zip(handles, schedule):
        assert torch.equal(h.wait(), alone(model, idx, new, kw))


def test_a_paged_int8_cache_on_the_triton_path_batches_as_generate(one_thread):
    model = loud_attention(tiny("triton", n_layer=1, n_kv_head=1))  # (tokens that read the pages)
    schedule = [(0, prompt(5, seed=1), 3, {}), (1, prompt(9, 2, seed=2), 3, dict(SAMPLED, seed=5))]
    engine = Engine(model, max_batch=3, kv_cache_dtype="int8", kv_pages=8, page_size=8)
    assert engine.paged and engine.cache.quantized
    check(model, schedule, engine, reference_alone=True, kv_cache_dtype="int8")


def test_eos_and_stop_end_a_request_early_and_free_its_slots(one_thread):
    """A's EOS (its third greedy token) and B's stop rule (at its second token) end them after 3 and 2 of 20
    tokens; C, waiting for both slots, is admitted at the next step."""
    model = loud_attention(tiny())
    a, b = prompt(5, seed=7), prompt(8, seed=7)  # (greedy: 51 51 96 and 10 51, neither end token drawn earlier)
    eos = int(generate(model, a, 3)[0, -1])
    second = int(generate(model, b, 2)[0, -1])

    def stop(idx):
        return idx[:, -1] == second
    schedule = [(0, a, 20, dict(eos_id=eos)), (0, b, 20, dict(stop=stop)), (1, prompt(4, 2, seed=3), 3, {})]
    admitted = check(model, schedule, Engine(model, max_batch=2))
    assert admitted == [0, 0, 3]


def test_stop_token_ids_min_tokens_and_ignore_eos_are_a_requests_own_as_generate_gives_them(one_thread):
    """vLLM's end settings in a batch: A (sampled, 2 rows) holds its EOS and stop token back for 3 tokens, then its
    biased end tokens end its rows (one padded while the other draws on); B ignores its EOS, drawn at every step;
    C has a stop token and no EOS (its rows padded with the stop token): each generate()'s alone, each freed."""
    model = tiny()
    a = dict(temperature=1.0, eos_id=5, stop_token_ids=[9], min_tokens=3, logit_bias={5: 3.5, 9: 3.5}, seed=6)
    b = dict(eos_id=5, ignore_eos=True, logit_bias={5: 50.0})
    c = dict(temperature=1.0, stop_token_ids=[9], logit_bias={9: 3.0}, seed=3)
    schedule = [(0, prompt(5, 2, seed=1), 8, a), (0, prompt(7, seed=2), 6, b), (1, prompt(4, 2, seed=3), 8, c)]
    check(model, schedule, Engine(model, max_batch=5))
    rows = run(Engine(model, max_batch=5), schedule)
    out_a, out_b, out_c = (h.wait() for h, _ in rows)
    assert not {5, 9} & set(out_a[:, 5:8].flatten().tolist())  # (the masked 3)
    # (seeded) the stop token ends row 0 at its 6th token, the EOS row 1, then padded with it, at its 5th
    assert out_a[:, 5:].tolist() == [[55, 95, 23, 44, 27, 9], [54, 59, 45, 55, 5, 5]]
    assert out_b[0, 7:].tolist() == [5] * 6
    assert out_c[:, 4:].tolist() == [[0, 13, 36, 71, 49, 32, 9], [9] * 7]  # padded with the stop token


def test_logprobs_and_logit_bias_are_a_requests_own_as_generate_gives_them(one_thread):
    """A request's logit_bias and logprobs (on_token's second argument) are generate()'s for it, with a request
    of neither in the same batch."""
    model = tiny()
    a, b = prompt(5, n=2, seed=1), prompt(7, seed=2)
    banned = int(generate(model, a[:1], 1)[0, -1])  # the greedy first token
    kw = dict(temperature=1.0, seed=3, logit_bias={3: 5.0, banned: -100}, logprobs=2)
    engine = Engine(model, max_batch=3)
    ha, hb = engine.submit(a, 6, **seeded(kw)), engine.submit(b, 6)
    while engine.running or engine.waiting:
        engine.step()
    got, want = [], []
    ids = ha.wait(lambda nxt, lp: got.append((nxt, lp)))
    assert torch.equal(ids, alone(model, a, 6, kw, on_token=lambda nxt, lp: want.append((nxt, lp))))
    assert banned not in ids[:, 5:].tolist() and len(got) == len(want) == 6
    for (nxt, lp), (nxt_, lp_) in zip(got, want):
        assert torch.equal(nxt, nxt_) and torch.equal(lp[1], lp_[1])
        assert torch.allclose(lp[0], lp_[0], atol=1e-5) and torch.allclose(lp[2], lp_[2], atol=1e-5)
    assert torch.equal(hb.wait(), generate(model, b, 6))


def within(fn, what: str):
    """fn()'s result, or the UserError it raised, run in a thread of its own: a hang fails the test (after 5 s)
    instead of the session."""
    out = []

    def go():
        try:
            out.append(fn())
        except UserError as e:
            out.append(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), f"{what} hung"
    return out[0]


def test_wait_never_hangs_on_an_engine_whose_thread_died(one_thread, monkeypatch):
    """A step that raises a BaseException (not caught by the loop: the thread dies with the request running):
    wait() raises a UserError naming the thread instead of waiting for ever; an engine stepped by hand, no
    thread, still waits for its caller's steps."""
    def died():
        raise KeyboardInterrupt
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # (the death expected: not reported)
    engine = Engine(tiny(), max_batch=1)
    engine.step = died
    handle = engine.start().submit(prompt(3), 4)
    assert "thread is not running" in str(within(lambda: handle.wait(poll=0.01), "wait()")) and handle.cancelled
    by_hand = Engine(tiny(), max_batch=1)
    handle, out = by_hand.submit(prompt(3), 2), []
    t = threading.Thread(target=lambda: out.append(handle.wait(poll=0.01)), daemon=True)
    t.start()
    time.sleep(0.1)  # (several polls with nobody stepping it: still waiting)
    assert t.is_alive() and not out
    while by_hand.waiting or by_hand.running:  # (not until_done: the waiter takes the queue's items)
        by_hand.step()
    t.join(5)
    assert out[0].shape == (1, 5)


def test_a_decode_step_runs_the_rows_up_to_the_last_busy_one(one_thread):
    """Slots go lowest first and a step runs cache rows 0..last busy: a lone request decodes one row, not four."""
    model = tiny()
    shapes = []
    model.tok_emb.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    check(model, [(0, prompt(5), 3, {}), (1, prompt(3, 2), 2, {})], Engine(model, max_batch=4))
    # (generate's own forwards follow the engine's, run by check): A's prefill, B's (once for its 2 rows) and
    # A's step alone, then one step over A and B (rows 0..2)
    assert shapes[:4] == [(1, 5), (1, 3), (1, 1), (3, 1)]


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("pages", [None, 10])
def test_a_decode_step_reads_the_longest_rows_keys_not_the_whole_context(one_thread, monkeypatch, kernels, pages):
    """A (12 + 2) and B (2 rows of 3 + 4) on a context of 40: each decode step's attention reads the keys up to the
    longest running row's ids + 1 (14, then with A ended 6, 7; a paged cache's whole pages of 4 for them: 16, 8, 8),
    not all 40, A's freed row below B's with its fill back to 0 (the Triton kernel refuses a kv_len past the keys),
    each prefill its prompt's (a paged cache's pages: 12, 4), and each request still draws generate()'s tokens with
    its logprobs (the logits: a key cut off shows there)."""
    import tritongpt.kernels.attention as attention
    from tritongpt.model.layers import MultiHeadAttention
    model, keys = loud_attention(tiny(kernels, n_layer=1)), []
    attend, flash = MultiHeadAttention.attend, attention.flash_attention

    def attended(self, q, k, *args):
        keys.append((q.size(2), k.size(2)))
        return attend(self, q, k, *args)

    def flashed(q, k, *args, block_table=None, **kw):
        keys.append((q.size(2), k.size(2) if block_table is None else block_table.size(1) * 4))
        return flash(q, k, *args, block_table=block_table, **kw)
    monkeypatch.setattr(MultiHeadAttention, "attend", attended)
    monkeypatch.setattr(attention, "flash_attention", flashed)
    engine = Engine(model, max_batch=4, kv_pages=pages, page_size=4)
    schedule = [(0, prompt(12), 2, dict(logprobs=0)), (0, prompt(3, 2, seed=1), 4, dict(logprobs=0))]
    out = run(engine, schedule)
    steps = [tk for tq, tk in keys if tq == 1]  # (the prefills' queries are their prompts)
    assert steps == ([14, 6, 7] if pages is None else [16, 8, 8])
    assert [tk for tq, tk in keys if tq > 1] == ([12, 3] if pages is None else [12, 4])
    with pytest.raises(UserError, match="bound is 1..40"):
        engine.cache.first_rows(2, 41)
    for (handle, _), (_, idx, new, kw) in zip(out, schedule):  # the tokens, and the logits by their logprobs
        got, want = [], []
        assert torch.equal(handle.wait(lambda nxt, lp: got.append(lp[0])),
                           generate(model, idx, new, on_token=lambda nxt, lp: want.append(lp[0]), **kw))
        torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=0, atol=1e-5)


def test_what_the_engine_refuses(one_thread):
    model = tiny()
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(UserError, match="max_batch must be a positive integer"):
            Engine(model, max_batch=bad)
    with pytest.raises(UserError, match="3 rows .n., more than the engine's max_batch 2"):
        Engine(model, max_batch=2).submit(prompt(4, 3), 2)
    with pytest.raises(UserError, match=r"token ids must be in \[0, 97\) \(the model's vocabulary\), got 0..97"):
        Engine(model, max_batch=2).submit(torch.tensor([[0, 97]]), 2)
    with pytest.raises(UserError, match="the engine does not slide the window"):
        Engine(model, max_batch=2).submit(prompt(4), 37)
    for bad in (0, 1.5, "2"):
        with pytest.raises(UserError, match="a request's copies must be an integer >= 1, got"):
            Engine(model, max_batch=2).submit(prompt(4), 0, copies=bad)
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 16}
    with pytest.raises(UserError, match="the batching engine does not take LongRoPE models"):
        Engine(tiny(position_encoding="rope", rope_scaling=longrope), max_batch=2)
    with pytest.raises(UserError, match="prefix caching shares the pages of a paged KV cache: give the engine"):
        Engine(model, max_batch=2, prefix_caching=True)
    with pytest.raises(UserError, match="prefix_caching must be a bool, got 1"):
        Engine(model, max_batch=2, kv_pages=4, prefix_caching=1)
    with pytest.raises(UserError, match="preemption must be a bool, got 'no'"):
        Engine(model, max_batch=2, kv_pages=4, preemption="no")


def test_a_failing_stop_rule_fails_its_request_alone(one_thread):
    model = loud_attention(tiny())

    def broken(idx):
        raise UserError("this stop rule is broken")
    schedule = [(0, prompt(5, seed=1), 4, {}), (0, prompt(6, seed=2), 4, dict(stop=broken))]
    engine = Engine(model, max_batch=2)
    (good, _), (bad, _) = run(engine, schedule)
    assert torch.equal(good.wait(), generate(model, prompt(5, seed=1), 4))
    with pytest.raises(UserError, match="this stop rule is broken"):
        bad.wait()
    assert engine.free == [0, 1]


def test_a_cancelled_request_ends_its_wait_whether_running_or_waiting(one_thread):
    """cancel() from the caller's side: the running request and the one waiting for its slot both end at the next
    step and their wait() raises Cancelled (it returned the running one's partial ids as if it had ended, and hung
    forever on the waiting one, whose queue never got a word); the slot is free again."""
    engine = Engine(tiny(), max_batch=1)
    running, waiting = engine.submit(prompt(5), 20), engine.submit(prompt(6, seed=1), 20)
    engine.step()
    assert running.slots is not None and waiting.slots is None
    running.cancel()
    waiting.cancel()
    engine.step()
    for handle in (running, waiting):
        ended = []

        def wait(h=handle):
            try:
                h.wait()
            except Cancelled:
                ended.append(True)
        t = threading.Thread(target=wait, daemon=True)
        t.start()
        t.join(5)
        assert ended == [True]
    assert engine.free == [0] and not engine.running and not engine.waiting



# -- prefix caching (vLLM's APC): full prompt blocks shared through the cache's prefix index ----------------------
def with_system(system, *tails):
    """Prompts [1, T] that start with the same system prompt."""
    return [torch.cat([system, tail], 1) for tail in tails]


def until_done(engine, handle, steps=50):
    while handle.slots is not None or handle.queue.empty():
        assert steps, "the request never ran to its end"
        engine.step()
        steps -= 1


@pytest.mark.parametrize("kernels,kv_dtype", [("reference", "auto"), ("reference", "int8"), ("triton", "auto"),
                                              ("triton", "int8")])
def test_prefix_caching_prefills_only_what_the_cache_lacks_and_draws_generates_tokens(one_thread, kernels,
                                                                                       kv_dtype):
    """Pages of 4, a system prompt of 9: A (13 tokens) prefills whole; B after it finds the system prompt's two full
    blocks and prefills 3 of its 11 tokens into 1 new page (its first decode's position too; the rest taken as it
    grows); C (n = 3, seeded) prefills its rest once, its rows
    sharing the full blocks' pages; D, A's very prompt (3 full blocks), still computes its last block's logits
    (prefill 4). Each request generate()'s tokens alone; at the end no row holds a page, every page free or cached."""
    model = loud_attention(tiny(kernels, n_layer=2 if kernels == "reference" else 1))
    T = []
    model.tok_emb.register_forward_pre_hook(lambda module, args: T.append(args[0].size(1)))
    system = prompt(9, seed=1)
    a, b, c = with_system(system, prompt(3, seed=2), prompt(2, seed=3), prompt(1, seed=4))
    a = torch.cat([a, prompt(1, seed=5)], 1)  # 13 tokens
    engine = Engine(model, max_batch=4, kv_cache_dtype=kv_dtype, kv_pages=16, page_size=4, prefix_caching=True)
    requests = [(a, 4, {}), (b, 4, dict(SAMPLED, seed=5)), (c.expand(3, -1), 3, dict(temperature=1.0, seed=7)),
                (a[:, :12], 3, {})]
    prefills, handles = [], []
    for idx, new, kw in requests:
        free, T[:] = len(engine.cache.free), []
        handles.append(engine.submit(idx, new, **seeded(kw)))
        engine.step()
        prefills.append(T[0])
        if len(handles) == 2:  # B: 3 pages, 2 of them the cached system prompt's (no row held them: free till now)
            assert free - len(engine.cache.free) == 3 and len(set(engine.cache.pages[0])) == 3
        if len(handles) == 3:  # C's 3 rows: 2 cached pages shared by all, and 1 of their own each
            rows = [engine.cache.pages[s] for s in handles[-1].slots]
            assert rows[0][:2] == rows[1][:2] == rows[2][:2] and len({p for r in rows for p in r}) == 5
            assert [engine.cache.refs[p] for p in rows[0][:2]] == [3, 3]
        until_done(engine, handles[-1])
    assert prefills == [13, 3, 2, 4]
    assert engine.stats == {"prompt_tokens": 13 + 11 + 10 + 12, "cached_prompt_tokens": 0 + 8 + 8 + 8,
                            "preemptions": 0}
    model.set_kernels("reference")  # (generate() alone: as check's reference_alone)
    for h, (idx, new, kw) in zip(handles, requests):
        assert torch.equal(h.wait(), alone(model, idx, new, kw, kv_cache_dtype=kv_dtype))
    cache = engine.cache
    assert not any(cache.refs) and cache.pages == [[]] * 4 and sorted(cache.free) == list(range(16))
    assert len(cache.cached) == len(cache.index) >= 3


def test_prefix_caching_evicts_the_least_recently_freed_pages_when_the_pool_runs_short(one_thread):
    """A pool of 6 pages of 4: A (a system prompt of 2 blocks + 5, 4 pages) ends, its 3 full blocks cached. B,
    another prompt, takes 4 at admission (14 + its first decode's position) and a 5th as it grows: the 3 uncached
    free pages first, then 2 cached ones, A's last blocks first (its first block, the one most shared, last). C,
    on A's system prompt, then finds its first block only; each request still generate()'s tokens."""
    model = tiny()
    system = prompt(8, seed=1)
    a, c = with_system(system, prompt(5, seed=2), prompt(3, seed=3))
    b = prompt(14, seed=4)
    engine = Engine(model, max_batch=2, kv_pages=6, page_size=4, prefix_caching=True)
    cache = engine.cache
    handles = [engine.submit(a, 3)]
    until_done(engine, handles[0])
    a_pages = list(cache.cached)  # least recently freed first: A's blocks last to first
    assert len(a_pages) == 3 and len(cache.free) == 6
    handles.append(engine.submit(b, 6, **seeded(dict(SAMPLED, seed=3))))
    engine.step()
    assert list(cache.cached) == a_pages[1:] and engine.stats["cached_prompt_tokens"] == 0
    until_done(engine, handles[1])
    assert engine.stats["preemptions"] == 0 and list(cache.cached)[:1] == a_pages[2:]
    handles.append(engine.submit(c, 3))
    until_done(engine, handles[2])
    assert engine.stats["cached_prompt_tokens"] == 4
    for h, (idx, new, kw) in zip(handles, [(a, 3, {}), (b, 6, dict(SAMPLED, seed=3)), (c, 3, {})]):
        assert torch.equal(h.wait(), alone(model, idx, new, kw))
    assert not any(cache.refs) and sorted(cache.free) == list(range(6))


def test_a_finished_requests_output_pages_stay_cached_for_the_next_turn(one_thread):
    """A chat's second turn: B's prompt is A's prompt (9), A's output (8) and new text (3). A fed 16 ids (its last
    drawn never), 4 full pages of 4, all cached at its end, so B reads 16 tokens from the cache (its prompt's 2
    blocks alone, 8, without A's output) and still draws generate()'s tokens; no page held at the end."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=2, kv_pages=12, page_size=4, prefix_caching=True)
    a = prompt(9, seed=1)
    first = engine.submit(a, 8)
    until_done(engine, first)
    b = torch.cat([first.wait(), prompt(3, seed=2)], 1)
    second = engine.submit(b, 5, **seeded(dict(temperature=1.0, seed=3)))
    until_done(engine, second)
    assert engine.stats["cached_prompt_tokens"] == 16 and engine.stats["prompt_tokens"] == 9 + 20
    assert torch.equal(second.wait(), alone(model, b, 5, dict(temperature=1.0, seed=3)))
    cache = engine.cache
    assert not any(cache.refs) and cache.pages == [[]] * 2 and sorted(cache.free) == list(range(12))


def test_a_stopped_or_cancelled_requests_fed_pages_stay_cached_not_its_last_token(one_thread):
    """Pages of 4. A (9) is ended by its stop rule at 16 ids: it fed 15 (the last drawn never), so 3 full pages are
    cached, not 4 (the 4th's last position holds no key: a next turn reading it would attend over garbage); C (6) is
    cancelled at 14 ids: its 13 fed, 3 pages, stay cached too, not its prompt's 1 alone. Each next turn (the ids so
    far and new text) reads 12 tokens from the cache and draws generate()'s tokens. One cancelled mid-prefill
    caches nothing."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=2, kv_pages=16, page_size=4, prefix_caching=True)
    a = engine.submit(prompt(9, seed=1), 12, stop=lambda ids: torch.full((ids.size(0),), ids.size(1) >= 16))
    until_done(engine, a)
    c = engine.submit(prompt(6, seed=4), 20)
    while c.idx.size(1) < 14:
        engine.step()
    c.cancel()
    engine.step()
    with pytest.raises(Cancelled):
        c.wait()
    for ids, more in ((a.wait(), prompt(3, seed=2)), (c.idx, prompt(2, seed=5))):
        assert ids.size(1) == (16 if ids is not c.idx else 14)
        cached = engine.stats["cached_prompt_tokens"]
        b = torch.cat([ids, more], 1)
        turn = engine.submit(b, 4)
        until_done(engine, turn)
        assert engine.stats["cached_prompt_tokens"] - cached == 12
        assert torch.equal(turn.wait(), generate(model, b, 4))
    # D cancelled after the first chunk of its prefill (4 of 13): its pages hold 4 keys, none of them cached, so E
    # on the same prompt reads nothing from the cache
    engine = Engine(model, max_batch=2, kv_pages=16, page_size=4, prefix_caching=True, max_prefill_tokens=4)
    d = engine.submit(prompt(13, seed=6), 3)
    engine.step()
    d.cancel()
    engine.step()
    e = engine.submit(prompt(13, seed=6), 3)
    until_done(engine, e)
    assert engine.stats["cached_prompt_tokens"] == 0 and torch.equal(e.wait(), generate(model, prompt(13, seed=6), 3))


def test_prefix_caching_admits_by_the_pages_it_takes(one_thread):
    """A request's n rows share their prompt's full blocks at admission: 3 rows of 9 + 3 positions (3 pages of 4 a
    row, 9 unshared) take 2 shared pages and 1 of their own each, 5, from a pool of 5; without prefix caching the
    request could never be admitted, nor with preemption (its rows, drawn apart, would recompute unshared)."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=4, kv_pages=5, page_size=4, prefix_caching=True, preemption=False)
    h = engine.submit(prompt(9, 3, seed=1), 4, **seeded(dict(temperature=1.0, seed=2)))
    engine.step()
    assert h.slots is not None and len(engine.cache.free) == 0
    until_done(engine, h)
    assert torch.equal(h.wait(), alone(model, prompt(9, 3, seed=1), 4, dict(temperature=1.0, seed=2)))
    for kw in ({}, dict(prefix_caching=True)):
        with pytest.raises(UserError, match="the request needs 9 KV pages"):
            Engine(model, max_batch=4, kv_pages=5, page_size=4, **kw).submit(prompt(9, 3, seed=1), 4)


# -- serve --max-batch ----------------------------------------------------------------------------------------
def test_serve_batches_concurrent_requests_to_the_text_each_gets_alone(tmp_path):
    from test_serve import call, events, start, tiny_run

    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    reqs = [{"prompt": "the cat", "max_tokens": 8, "temperature": 0},
            {"prompt": "a dog ran in", "max_tokens": 5, "n": 2, "seed": 3, "stream": True},
            {"prompt": "Hello", "max_tokens": 6, "n": 2, "seed": 1, "top_p": 0.9, "frequency_penalty": 0.4},
            {"prompt": "the bird", "max_tokens": 7, "stop": ["a"], "seed": 2, "stream": True},
            {"prompt": "0123", "max_tokens": 9, "seed": 4}]
    texts = {}
    paged = ("--max-batch", "4", "--kv-cache-pages", "32", "--kv-page-size", "4")  # (128: the context)
    for flags in (("--max-batch", "1"), ("--max-batch", "4"), paged, (*paged, "--enable-prefix-caching"),
                  ("--max-batch", "4", "--max-prefill-tokens", "3")):
        server = start(folder, *flags)
        server.RequestHandlerClass.log_message = lambda *a: None
        got = [None] * len(reqs)

        def ask(i):
            status, out = call(server, "/v1/completions", reqs[i])
            assert status == 200
            if reqs[i].get("stream"):
                chunks = events(out)
                got[i] = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == j)
                          for j in range(reqs[i].get("n", 1))]
            else:
                got[i] = [c["text"] for c in out["choices"]]
        try:
            assert (server.app.engine is None) == (flags[1] == "1")
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(reqs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            texts[flags[1:]] = got
            if server.app.engine is not None:
                assert server.app.engine.paged == ("--kv-cache-pages" in flags)
                assert server.app.engine.max_prefill_tokens == (3 if "--max-prefill-tokens" in flags else None)
                assert server.app.engine.free == [0, 1, 2, 3]
                status, out = call(server, "/v1/completions", {"prompt": "x", "n": 5})
                assert status == 400 and out["error"]["param"] == "n" and "--max-batch 4" in out["error"]["message"]
        finally:
            server.shutdown()
            server.server_close()
    assert all(None not in t and t == texts["1",] for t in texts.values())


def test_serve_with_prefix_caching_prefills_a_repeated_prompt_once(tmp_path, capsys):
    """The same prompt twice: the second reads its full pages from the cache and answers as the first; shutdown
    says how many prompt tokens the cache gave."""
    from test_serve import call, start, tiny_run

    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    server = start(folder, "--max-batch", "2", "--kv-cache-pages", "32", "--kv-page-size", "4",
                   "--enable-prefix-caching")
    server.RequestHandlerClass.log_message = lambda *a: None
    body = {"prompt": "the cat sat on the mat and the dog ran in the park", "max_tokens": 4, "temperature": 0}
    try:
        answers = [call(server, "/v1/completions", body) for _ in range(2)]
        stats = server.app.engine.stats
    finally:
        server.shutdown()
        server.server_close()
    assert [status for status, _ in answers] == [200, 200] and answers[0][1]["choices"] == answers[1][1]["choices"]
    prompt_tokens = answers[0][1]["usage"]["prompt_tokens"]
    cached = (prompt_tokens - 1) // 4 * 4
    assert cached > 0 and stats == {"prompt_tokens": 2 * prompt_tokens, "cached_prompt_tokens": cached,
                                    "preemptions": 0}
    assert f"prefix caching: {cached} of {2 * prompt_tokens} prompt tokens read from the cache" in \
        capsys.readouterr().err


def test_serve_cancels_the_request_of_a_client_that_left(tmp_path, monkeypatch):
    """A client asking for 100 tokens hangs up mid-way: its request stops decoding at the next steps (its slots
    free, far fewer than 100 tokens drawn), and the next request is served."""
    from test_serve import call, running_request, start, tiny_run

    folder = tmp_path / "run"
    tiny_run(folder, "chat")
    server = start(folder, "--max-batch", "2")
    server.RequestHandlerClass.log_message = lambda *a: None
    engine = server.app.engine
    real = engine.step
    seen = []

    def slow_step():  # ~100 steps take 2 s: the hang-up lands mid-request
        seen.extend(r for r in engine.running if r not in seen)
        time.sleep(0.02)
        return real()
    monkeypatch.setattr(engine, "step", slow_step)
    try:
        for stream in (False, True):
            sock, deadline = running_request(server, {"prompt": "the cat", "max_tokens": 100, "n": 2,
                                                      "stream": stream})
            time.sleep(0.1)
            sock.close()
            while (engine.running or engine.free != [0, 1]) and time.time() < deadline:
                time.sleep(0.01)
            assert engine.free == [0, 1] and not engine.running
            drawn = seen[-1].idx.size(1) - seen[-1].start
            assert 0 < drawn < 50, drawn
        status, out = call(server, "/v1/completions", {"prompt": "the", "max_tokens": 3, "temperature": 0})
        assert status == 200 and out["usage"]["completion_tokens"] == 3
    finally:
        server.shutdown()
        server.server_close()


def test_serve_serves_a_longrope_model_one_request_at_a_time(tmp_path, capsys):
    from test_serve import call, start, tiny_run

    folder = tmp_path / "run"
    tok = tiny_run(folder, "chat")
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 64}
    GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_embd=32, n_layer=1, n_head=2,
                       position_encoding="rope", rope_scaling=longrope)).save(folder / "ckpt-0000001" /
                                                                              "model.safetensors")
    server = start(folder, "--kv-cache-pages", "8", "--max-prefill-tokens", "16")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        assert server.app.engine is None
        err = capsys.readouterr().err
        assert "does not take LongRoPE models" in err and "serving one request at a time" in err
        # the engine's flags, asked for and not used: said, not silently dropped
        assert "--kv-cache-pages 8 is not used (the engine's paged cache)" in err
        assert "--max-prefill-tokens 16 is not used (the engine's)" in err
        assert call(server, "/v1/completions", {"prompt": "the", "max_tokens": 3})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_the_engines_cache_has_the_dtype_its_keys_will_have_under_autocast(one_thread):
    """Made under the server's autocast (bf16 here): an fp32 cache beside bf16 keys would be cast every layer."""
    model = tiny()
    for pages in (None, 8):
        engine = Engine(model, max_batch=2, autocast=lambda: torch.autocast("cpu", torch.bfloat16), kv_pages=pages)
        assert engine.cache.dtype == engine.cache.k.dtype == torch.bfloat16



# -- CUDA graphs: a decode step a replay of its bucket's graph --------------------------------------------------
def graphed(model, log, **kw):
    """An Engine of 4 rows (buckets 1, 2, 4) with cuda_graph, its capture emulated (test_decode_graph's
    fx_capture); log gets "capture" at each capture and the rows of each replay."""
    from test_decode_graph import fx_capture

    def capture(fn, device):
        log.append("capture")
        replay = fx_capture(fn)

        def logged():
            out = replay()
            log.append(out.size(0))
            return out
        return logged
    return Engine(model, max_batch=4, cuda_graph=True, capture=capture, **kw)


def buckets_run(log):
    """The log as [(rows, captured at that step)] a change of bucket."""
    runs = []
    for i, rows in enumerate(log):
        if rows != "capture" and (not runs or runs[-1][0] != rows):
            runs.append((rows, i > 0 and log[i - 1] == "capture"))
    return runs


@pytest.mark.parametrize("pages", [None, 16])
def test_cuda_graph_steps_replay_a_graph_a_bucket_and_draw_generates_tokens(one_thread, pages):
    """A (1 row) alone, B joins (rows 0..1), C's 2 rows (0..3); C ends, D takes slot 2 (rows 0..2: bucket 4, row 3
    free, a paged cache's on its scratch page); D ends: A and B again. Greedy and seeded, each request gets
    generate()'s tokens alone, and each bucket is captured once, at its first step."""
    model = tiny()
    log = []
    engine = graphed(model, log, kv_pages=pages, page_size=4)
    schedule = [(0, prompt(5, seed=1), 12, {}),
                (1, prompt(7, seed=2), 11, dict(SAMPLED, seed=5)),
                (2, prompt(4, 2, seed=3), 3, dict(temperature=1.0, top_k=20, seed=7)),
                (6, prompt(6, seed=4), 3, {})]
    assert check(model, schedule, engine) == [0, 1, 2, 6]
    assert buckets_run(log) == [(1, True), (2, True), (4, True), (2, False), (4, False), (2, False)]
    assert log.count("capture") == 3 and sorted(engine.graphs) == [1, 2, 4]


def test_cuda_graph_steps_on_the_triton_path_draw_generates_tokens(one_thread):
    """The Triton path's attention (kv_len a row, read in the kernel) recorded and replayed: A alone, then B's 2
    rows beside it (rows 0..2: bucket 4), then A alone again."""
    model = tiny("triton", n_layer=1)
    log = []
    schedule = [(0, prompt(5, seed=1), 5, {}), (1, prompt(3, 2, seed=2), 2, dict(temperature=1.0, seed=3))]
    check(model, schedule, graphed(model, log), reference_alone=True)
    assert buckets_run(log) == [(1, True), (4, True), (1, False)]


def test_what_the_engine_refuses_with_cuda_graphs(one_thread):
    """At construction, not at the first decode step: off CUDA (no capture given), a model no graph replays, a
    flag that is not a bool."""
    model = tiny()
    with pytest.raises(UserError, match="CUDA graphs need the model on a CUDA device; it is on cpu"):
        Engine(model, max_batch=2, cuda_graph=True)
    moe = tiny(position_encoding="rope", norm="rmsnorm", mlp="swiglu", n_experts=4, experts_per_token=2)
    with pytest.raises(UserError, match="CUDA-graph decoding does not take mixture-of-experts models"):
        Engine(moe, max_batch=2, cuda_graph=True, capture=lambda fn, device: fn)
    with pytest.raises(UserError, match="cuda_graph must be a bool, got 1"):
        Engine(model, max_batch=2, cuda_graph=1)
    assert Engine(model, max_batch=6, cuda_graph=True, capture=lambda fn, device: fn).buckets == [1, 2, 4, 6]


def test_cuda_graph_steps_read_the_pages_prefix_caching_attaches(one_thread):
    """A (a system prompt of 2 blocks + 3) runs alone, bucket 1 captured, and ends, its blocks cached; B on the same
    system prompt attaches them at admission, after the capture: the replay reads block_table in place, so B decodes
    over the cached pages and gets generate()'s tokens."""
    model = tiny()
    log = []
    engine = graphed(model, log, kv_pages=8, page_size=4, prefix_caching=True)
    a, b = with_system(prompt(8, seed=1), prompt(3, seed=2), prompt(2, seed=3))
    handles = [engine.submit(a, 4)]
    until_done(engine, handles[0])
    handles.append(engine.submit(b, 5, **seeded(dict(SAMPLED, seed=4))))
    until_done(engine, handles[1])
    assert engine.stats["cached_prompt_tokens"] == 8 and log.count("capture") == 1
    for h, (idx, new, kw) in zip(handles, [(a, 4, {}), (b, 5, dict(SAMPLED, seed=4))]):
        assert torch.equal(h.wait(), alone(model, idx, new, kw))
    assert not any(engine.cache.refs)


@pytest.mark.cuda
@pytest.mark.parametrize("kernels,pages", [("reference", None), ("triton", None), ("triton", 16)])
def test_cuda_graph_steps_on_cuda_draw_generates_tokens(kernels, pages):
    """A real capture a bucket (fp32 on the GPU, greedy: a batched step's logits differ from one row's by rounding
    only): rows 1, 2, 4 (3 busy), 2; every request generate()'s tokens alone, one graph a bucket."""
    model = tiny(kernels).cuda()
    engine = Engine(model, max_batch=4, cuda_graph=True, kv_pages=pages, page_size=4)
    schedule = [(0, prompt(5, seed=1).cuda(), 12, {}), (1, prompt(7, seed=2).cuda(), 11, {}),
                (2, prompt(4, seed=3).cuda(), 3, {}), (6, prompt(6, seed=4).cuda(), 3, {})]
    check(model, schedule, engine)
    assert sorted(engine.graphs) == [1, 2, 4]


def test_a_request_whose_pages_cannot_be_taken_fails_alone_and_gives_its_slots_back(one_thread, monkeypatch):
    """An admission that raises (a reserve refused) ends that request with the error, its rows and pages back,
    never a wait() left hanging; the next request is served."""
    model = tiny()
    engine = Engine(model, max_batch=2, kv_pages=12, page_size=4)
    real, calls = engine.cache.reserve, []

    def reserve(row, length):
        calls.append(row)
        if len(calls) == 1:
            raise UserError("no pages today")
        return real(row, length)
    monkeypatch.setattr(engine.cache, "reserve", reserve)
    first, second = engine.submit(prompt(5, seed=1), 3), engine.submit(prompt(6, seed=2), 3)
    while engine.running or engine.waiting:
        engine.step()
    with pytest.raises(UserError, match="no pages today"):
        first.wait()
    assert torch.equal(second.wait(), alone(model, prompt(6, seed=2), 3, {}))
    assert engine.free == [0, 1] and engine.cache.num_free == 12


# -- chunked prefill (vLLM's, Sarathi-Serve): at most max_prefill_tokens prompt tokens a step --------------------
def chunked_run(monkeypatch, model, schedule, after_step=None, **kw):
    """schedule through Engine(model, max_prefill_tokens=4, **kw), each step's prefill chunks counted (their prompt
    tokens, in FIFO order), after_step(engine, step) called after each; no forward a step runs outside its decode
    carries more than 4 tokens, its padding included (a batched prefill's): -> (engine, handles, each step's
    prefill chunks' token counts, each step's requests that got tokens)."""
    engine = Engine(model, max_prefill_tokens=4, **kw)
    counts, arrived, phase = [], [], {"step": False, "decode": False}
    hidden, decode, step_fn, planned = model.hidden, engine._decode, engine.step, engine._chunks

    def counted_hidden(ids, cache=None, *a, **k):
        assert phase["decode"] or ids.numel() <= 4
        return hidden(ids, cache, *a, **k)

    def counted_chunks():
        chunks = planned()
        counts[-1].extend(c.end - c.start for c in chunks)
        return chunks

    def counted_decode(decoding):
        phase["decode"] = True
        try:
            return decode(decoding)
        finally:
            phase["decode"] = False
    monkeypatch.setattr(model, "hidden", counted_hidden)
    monkeypatch.setattr(engine, "_decode", counted_decode)
    monkeypatch.setattr(engine, "_chunks", counted_chunks)
    handles, step = [None] * len(schedule), 0
    while None in handles or engine.running or engine.waiting:
        for i, (at, idx, new, settings) in enumerate(schedule):
            if at == step:
                handles[i] = engine.submit(idx, new, **seeded(settings))
        before = [0 if h is None else h.queue.qsize() for h in handles]
        counts.append([])
        phase["step"] = True
        step_fn()
        phase["step"] = False
        arrived.append({i for i, h in enumerate(handles) if h is not None and h.queue.qsize() > before[i]})
        if after_step is not None:
            after_step(engine, step)
        step += 1
    monkeypatch.undo()
    return engine, handles, counts, arrived


# X (3 tokens, 1 new) ends in step 0; A (6) prefills 1 + 4 + 1 in steps 0..2; B (13, n = 2 equal rows, greedy:
# a wrong key shows in its tokens) from step 2 in 3 + 4 + 4 + 2 in slot 0, below A's (so A's decode runs B's row
# while it prefills); C (2 unequal rows of 7, sampled) prefills each row in turn after B
CHUNKED = [(0, prompt(3, seed=7), 1, {}), (0, prompt(6, seed=1), 8, {}), (1, prompt(13, 2, seed=2), 8, {}),
           (2, torch.cat([prompt(7, seed=3), prompt(7, seed=4)]), 4, dict(SAMPLED, seed=5))]


@pytest.mark.parametrize("kernels,kv_dtype,pages", [("reference", "auto", None), ("reference", "int8", None),
                                                    ("reference", "auto", 24), ("triton", "auto", 24)])
def test_chunked_prefill_caps_a_steps_prompt_tokens_and_keeps_decoding(one_thread, monkeypatch, kernels, kv_dtype,
                                                                       pages):
    """max_prefill_tokens 4: no step's prefill forwards carry more than 4 prompt tokens in all, every prompt token
    prefilled once (B's equal rows once), A decodes a token in each step of B's prefill, and every request draws
    generate()'s tokens alone (both caches, an int8 one, the Triton path)."""
    model = loud_attention(tiny(kernels, n_layer=2 if kernels == "reference" else 1, n_kv_head=1))
    paging = {} if pages is None else dict(kv_pages=pages, page_size=4)
    engine, handles, counts, arrived = chunked_run(monkeypatch, model, CHUNKED, max_batch=5, kv_cache_dtype=kv_dtype,
                                                   **paging)
    assert max(sum(c) for c in counts) == 4 and sum(map(sum, counts)) == 3 + 6 + 13 + 2 * 7
    assert counts[:6] == [[3, 1], [4], [1, 3], [4], [4], [2, 2]]
    assert [i for i, got in enumerate(arrived) if 2 in got][0] == 5  # B's first token: after its last chunk
    assert all(1 in arrived[s] for s in (2, 3, 4, 5))  # A's tokens in each step of B's prefill
    model.set_kernels("reference")  # (generate() alone: as check's reference_alone)
    for h, (_, idx, new, settings) in zip(handles, CHUNKED):
        assert torch.equal(h.wait(), alone(model, idx, new, settings, kv_cache_dtype=kv_dtype))
    assert engine.free == list(range(5)) and not engine.running


def test_chunked_prefill_with_prefix_caching_prefills_what_the_cache_lacks(one_thread, monkeypatch):
    """Pages of 4, max_prefill_tokens 4: A (2 equal rows of a system prompt of 9 + 3, slots 0 and 1) prefills its
    12 tokens in steps 0..2, then F (2, slot 2) and E (9, slot 3, from step 3). C (2 equal rows of the system
    prompt + 6) is admitted at step 4 into A's freed slots 0 and 1, below F's: it finds 2 cached blocks and gets no
    token of step 4's budget (E's), then prefills its 7 (1 + 4 + 2) while F decodes, F's decode forwards writing
    C's rows only where nothing is read (never into the shared pages). Each request generate()'s tokens alone."""
    model = loud_attention(tiny())
    system = prompt(9, seed=1)
    a, c = with_system(system, prompt(3, seed=2), prompt(6, seed=3))
    schedule = [(0, a.expand(2, -1), 2, {}), (0, prompt(2, seed=9), 16, {}), (3, prompt(9, seed=10), 3, {}),
                (4, c.expand(2, -1), 6, {})]
    cached = {}

    def watch(engine, step):  # the system prompt's 2 cached pages, as A left them (step 3) and at the end
        if step == 3 or not engine.running:
            pages = engine.cache.lookup(system[0, :8])
            cached[step > 3] = [engine.cache.k[:, pages].clone(), engine.cache.v[:, pages].clone()]
    engine, handles, counts, arrived = chunked_run(monkeypatch, model, schedule, watch, max_batch=4, kv_pages=24,
                                                   page_size=4, prefix_caching=True)
    assert all(torch.equal(x, y) for x, y in zip(cached[False], cached[True]))
    assert counts[:8] == [[4], [4], [4], [2, 2], [4], [3, 1], [4], [2]] and max(sum(c) for c in counts) == 4
    assert [i for i, got in enumerate(arrived) if 3 in got][0] == 7 and all(1 in arrived[s] for s in range(3, 8))
    assert engine.stats == {"prompt_tokens": 12 + 2 + 9 + 15, "cached_prompt_tokens": 8, "preemptions": 0}
    for h, (_, idx, new, settings) in zip(handles, schedule):
        assert torch.equal(h.wait(), alone(model, idx, new, settings))
    assert not any(engine.cache.refs) and sorted(engine.cache.free) == list(range(24))


def test_the_engine_refuses_a_max_prefill_tokens_that_is_not_a_positive_int(one_thread):
    for bad in (0, -3, 2.5, "4"):
        with pytest.raises(UserError, match=f"max_prefill_tokens must be a positive integer .* got {bad!r}"):
            Engine(tiny(), max_prefill_tokens=bad)


# -- preemption (vLLM's scheduler): pages taken as rows grow; the latest admitted request recomputed -------------
# Pages of 4 in a pool of 10. Their whole budgets take A 5 pages, B (2 rows) 8, C 4, D 4 (21): the old rule admits
# A alone; taken as they grow (the prompt and the first decode's position: 2, 4, 1 and 2) all four fit at once,
# then run short of pages and preempt
PREEMPTING = [(prompt(5, seed=1), 14, {}), (prompt(6, 2, seed=2), 10, dict(SAMPLED, seed=5)),
              (prompt(3, seed=3), 12, dict(temperature=1.0, top_k=20, seed=7)), (prompt(7, seed=4), 9, {})]
# (the Triton path's, smaller: a pool of 5 pages, A 3 of them, B 2 x 2; admitted with 2 + 2)
TRITON_PREEMPTING = [(prompt(5, seed=1), 7, {}), (prompt(3, 2, seed=3), 5, dict(SAMPLED, seed=5))]


def preempted_run(model, engine, requests, watch=None, reference_alone=False, **extra):
    """requests [(idx, new, settings)] submitted at once and stepped to their end (watch(engine, handles) after each
    step): each gets generate()'s tokens alone, streamed once each (its stop rule asked once a length: nothing
    appended twice), and the cache is empty at the end (no page held, every refcount zero, every slot free). -> the
    most requests running at once."""
    asked = [[] for _ in requests]

    def stop(lengths):
        return lambda ids: lengths.append(ids.size(1)) or torch.zeros(ids.size(0), dtype=torch.bool)
    handles = [engine.submit(idx, new, stop=stop(asked[i]), **seeded(kw)) for i, (idx, new, kw) in enumerate(requests)]
    most, steps = 0, 0
    while engine.running or engine.waiting:
        assert steps < 200, "the requests never ran to their end"
        engine.step()
        steps += 1
        most = max(most, len(engine.running))
        if watch is not None:
            watch(engine, handles)
    if reference_alone:  # (as check's)
        model.set_kernels("reference")
    for h, lengths, (idx, new, kw) in zip(handles, asked, requests):
        streamed = []
        out = h.wait(on_token=streamed.append)
        assert torch.equal(out, alone(model, idx, new, kw, **extra))
        assert torch.equal(torch.cat(streamed, 1), out[:, idx.size(1):])
        assert lengths == list(range(idx.size(1) + 1, idx.size(1) + new + 1))
    cache = engine.cache
    assert not any(cache.refs) and cache.pages == [[]] * cache.batch_size and cache.num_free == cache.num_pages
    assert engine.free == list(range(engine.max_batch)) and not engine.waiting
    return most


@pytest.mark.parametrize("kernels,kv_dtype", [("reference", "auto"), ("reference", "int8"), ("triton", "auto")])
def test_preemption_admits_by_the_prompts_pages_and_recomputes_to_generates_tokens(one_thread, kernels, kv_dtype):
    """All four requests run at once where the old rule admits one; pages run short, the latest admitted are
    preempted and recomputed (prompt + drawn tokens), and each still draws generate()'s tokens alone (greedy and
    seeded with penalties; float and int8 pages; the Triton path), streamed once each."""
    model = loud_attention(tiny(kernels, n_layer=2 if kernels == "reference" else 1, n_kv_head=1))
    requests, pages = (PREEMPTING, 10) if kernels == "reference" else (TRITON_PREEMPTING, 5)
    if kernels == "reference" and kv_dtype == "auto":
        old = Engine(model, max_batch=5, kv_pages=10, page_size=4, preemption=False)
        for idx, new, kw in requests:
            old.submit(idx, new, **seeded(kw))
        old.step()
        assert len(old.running) == 1
    engine = Engine(model, max_batch=5, kv_pages=pages, page_size=4, kv_cache_dtype=kv_dtype)
    assert preempted_run(model, engine, requests, reference_alone=True, kv_cache_dtype=kv_dtype) == len(requests)
    assert engine.stats["preemptions"] > 0


def test_a_preempted_request_cancelled_while_it_waits_ends_holding_nothing(one_thread):
    """The first request preempted is cancelled while it waits to be recomputed: its wait() raises Cancelled, the
    others still draw generate()'s tokens, and no page or slot is left held."""
    model = tiny()
    engine = Engine(model, max_batch=5, kv_pages=10, page_size=4)
    handles = [engine.submit(idx, new, **seeded(kw)) for idx, new, kw in PREEMPTING]
    while not engine.stats["preemptions"]:
        engine.step()
    victim = engine.waiting[0]
    victim.cancel()
    while engine.running or engine.waiting:
        engine.step()
    with pytest.raises(Cancelled):
        victim.wait()
    for h, (idx, new, kw) in zip(handles, PREEMPTING):
        if h is not victim:
            assert torch.equal(h.wait(), alone(model, idx, new, kw))
    assert not any(engine.cache.refs) and engine.cache.num_free == 10 and engine.free == list(range(5))


def test_growing_pages_scans_the_running_list_no_more_per_request(one_thread):
    """_grow's check, for each running request, of whether an earlier one's pages preempted it reads the step's
    victims, not `r in self.running` (a scan of the list: the running requests squared, a step's host time that
    grows with the batch): a list counting its scans sees none while 12 running requests grow, and the ones
    preempted for the pages (the latest admitted) are still passed over, their pages given back."""
    class Scanned(list):
        scans = 0

        def __contains__(self, item):
            Scanned.scans += 1
            return super().__contains__(item)

    model = tiny(n_layer=1)
    engine = Engine(model, max_batch=12, kv_pages=26, page_size=4)
    for j in range(12):  # (2 pages each at admission, 8 positions: a row of 9 ids writes into a third)
        engine.submit(prompt(6, seed=j), 6)
    while engine.running[0].idx.size(1) < 9 if engine.running else True:
        engine.step()
    assert len(engine.running) == 12 and engine.cache.num_free == 2
    engine.running = Scanned(engine.running)
    latest = engine.running[-1]
    with engine.cond:
        assert engine._grow()
    assert Scanned.scans == 0
    # (the latest admitted first, each victim sent to the front: the waiting queue in admission order; a victim the
    # loop reaches later is passed over, never grown without slots)
    victims = list(engine.waiting)
    assert victims and victims[-1] is latest and all(r.slots is None for r in victims)
    assert list(engine.running) + victims == sorted(list(engine.running) + victims, key=lambda r: r.queued)
    assert all(len(engine.cache.pages[s]) == 3 for r in engine.running for s in r.slots)


def test_a_preempted_request_goes_back_to_the_front_of_the_queue_and_cuda_graph_steps_run_it(one_thread):
    """max_batch 4 (graphed: buckets 1, 2, 4, the capture emulated on the CPU): A, B's 2 rows and C run, D waits
    for a slot; C, the latest admitted, is the first preempted and goes back in front of D, readmitted first.
    Each request still generate()'s tokens; each bucket captured once."""
    model = loud_attention(tiny(n_layer=1))
    log, first = [], []

    def watch(engine, handles):
        if engine.stats["preemptions"] and not first:
            first.extend([handles.index(r) for r in engine.waiting])
    engine = graphed(model, log, kv_pages=10, page_size=4)
    assert preempted_run(model, engine, PREEMPTING, watch) == 3 and engine.stats["preemptions"] > 0
    assert first == [2, 3] and log.count("capture") == len(engine.graphs)


@pytest.mark.parametrize("kw", [dict(prefix_caching=True), dict(max_prefill_tokens=3),
                                dict(prefix_caching=True, max_prefill_tokens=3)])
def test_preemption_with_prefix_caching_and_chunked_prefill_draws_generates_tokens(one_thread, kw):
    """Three requests on one system prompt of 2 pages in a pool of 10: preempted, a request's recompute finds the
    cached pages of its prompt (and of its drawn tokens' full pages), and chunked, it prefills in chunks of 3 like
    any prompt; each request generate()'s tokens alone, every refcount back to zero."""
    model = loud_attention(tiny())
    system = prompt(8, seed=1)
    a, b, c = with_system(system, prompt(1, seed=2), prompt(2, seed=3), prompt(3, seed=4))
    # (B's 2 equal rows greedy: recomputed still equal, prefilled once and shared, as at their first admission)
    greedy = dict(repetition_penalty=1.3, frequency_penalty=0.5)
    requests = [(a, 14, {}), (b.expand(2, -1), 10, greedy), (c, 9, dict(temperature=1.0, seed=7))]
    engine = Engine(model, max_batch=4, kv_pages=10, page_size=4, **kw)
    caching = kw.get("prefix_caching", False)
    # (B's rows share the system prompt's pages with prefix caching: all three fit at once; without it, two)
    assert preempted_run(model, engine, requests) == (3 if caching else 2) and engine.stats["preemptions"] > 0
    # all three admitted in one step (no hits then): what the cache gave, it gave the recomputes
    assert (engine.stats["cached_prompt_tokens"] > 0) == caching


def test_a_preempted_requests_recompute_reads_its_drawn_tokens_pages_back_with_prefix_caching(one_thread):
    """With prefix caching a preempted request's full pages of the tokens it fed, drawn ones too, stay cached: B's
    prompt of 3 fills no page, so every cached token its recompute reads is one it drew (without them entering the
    index it prefilled them all again); its tokens are still generate()'s."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=2, kv_pages=7, page_size=4, prefix_caching=True)
    requests = [(prompt(5, seed=1), 14, {}), (prompt(3, seed=2), 12, dict(temperature=1.0, seed=3))]
    seen = []
    assert preempted_run(model, engine, requests, lambda e, handles: seen.append(handles)) == 2
    assert engine.stats["preemptions"] == 1
    assert engine.stats["cached_prompt_tokens"] == 8  # (of B's 12 fed: the third page evicted by A's growth)
    # a request's usage (serve's cached_tokens) is its first prefill's hits: the recompute's 8 are not B's
    assert [h.cached for h in seen[-1]] == [0, 0]


@pytest.mark.parametrize("caching", [False, True])
def test_a_row_that_ended_takes_no_more_pages(one_thread, caching):
    """B's 2 sampled rows of 6 + 11: the first draws its EOS second (88), then holds the 2 pages it had (the old rule
    gave it all 4 a row of 16 positions takes: 8 for B); the rows' tokens and the live rows' logprobs are still
    generate()'s, and every page comes back; with prefix caching the pages each row holds are cached at its end
    (2 + 4), not the 4 blocks the ended row fed."""
    model = loud_attention(tiny())
    b = torch.cat([prompt(6, seed=2), prompt(6, seed=3)])
    kw = dict(temperature=1.0, seed=5, eos_id=88, logprobs=2)
    engine = Engine(model, max_batch=2, kv_pages=8, page_size=4, prefix_caching=caching)
    handle, held = engine.submit(b, 11, **seeded(kw)), []
    while engine.running or engine.waiting:
        engine.step()
        if handle.slots is not None:
            held.append([len(engine.cache.pages[s]) for s in handle.slots])
    got, want = [], []
    out = handle.wait(lambda nxt, lp: got.append((nxt, lp)))
    assert torch.equal(out, alone(model, b, 11, kw, on_token=lambda nxt, lp: want.append((nxt, lp))))
    assert out[0, 7] == 88 and held[-1] == [2, 4]
    live = torch.ones(2, dtype=torch.bool)
    for (nxt, lp), (_, lp_) in zip(got, want):  # (a row's logprobs past its EOS are padding, as its tokens)
        assert torch.allclose(lp[0][live], lp_[0][live], atol=1e-5)
        live &= nxt[:, 0] != 88
    assert not live[0] and live[1]
    assert not any(engine.cache.refs) and engine.cache.num_free == 8
    assert len(engine.cache.cached) == (6 if caching else 0)


def test_a_request_preempted_with_a_row_done_draws_generates_tokens_and_logprobs(one_thread):
    """B's 2 sampled rows, the first ended by its EOS, are preempted by A's growth and recomputed (the done row's
    EOS padding too): each request's tokens and logprobs are generate()'s, the first token after the recompute's
    drawn from its prefill's logits; both budgets end exactly at a page's end (3 + 14 - 1 and 6 + 11 - 1 = 16)."""
    model = loud_attention(tiny())
    b = torch.cat([prompt(6, seed=2), prompt(6, seed=3)])
    sampled = dict(temperature=1.0, seed=5, eos_id=88, logprobs=2)  # (88: the first row's second token)
    requests = [(prompt(3, seed=1), 14, dict(logprobs=2)), (b, 11, sampled)]
    engine = Engine(model, max_batch=3, kv_pages=8, page_size=4)
    handles = [engine.submit(idx, new, **seeded(kw)) for idx, new, kw in requests]
    waiting = []  # B's rows done, each step it waits to be recomputed
    while engine.running or engine.waiting:
        engine.step()
        waiting += [h.done.tolist() for h in engine.waiting]
    assert engine.stats["preemptions"] == 1 and waiting and all(done == [True, False] for done in waiting)
    for h, (idx, new, kw) in zip(handles, requests):
        got, want = [], []
        out = h.wait(lambda nxt, lp: got.append((nxt, lp)))
        assert torch.equal(out, alone(model, idx, new, kw, on_token=lambda nxt, lp: want.append((nxt, lp))))
        assert len(got) == len(want) == new
        for (nxt, lp), (nxt_, lp_) in zip(got, want):
            assert torch.equal(nxt, nxt_) and torch.equal(lp[1], lp_[1])
            assert torch.allclose(lp[0], lp_[0], atol=1e-5) and torch.allclose(lp[2], lp_[2], atol=1e-5)
    assert not any(engine.cache.refs) and engine.cache.num_free == 8 and engine.free == [0, 1, 2]


# -- the phases' clocks (/metrics' queue, prefill, decode and inference times: train/metrics.py) --------------------
def fake_clock(monkeypatch):
    """The engine's time.monotonic, a clock the test sets ([seconds]): stamps exact whatever the machine's speed."""
    import types

    import tritongpt.train.engine as engine_module

    clock = [0.0]
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    return clock


def test_a_request_is_stamped_queued_scheduled_and_at_its_first_and_last_tokens(one_thread, monkeypatch):
    """max_batch 2, A (3 tokens), B (5) and C (2) queued at 0, step i at time i + 1: A and B are admitted at 1 and
    draw their first tokens there (one step prefills and draws), A's last at 3; C waits for A's slot, admitted at 4
    (queued 4 s), its last token at 5 with B's."""
    clock = fake_clock(monkeypatch)
    engine = Engine(tiny(), max_batch=2)
    a, b, c = (engine.submit(prompt(4 + i, seed=i), new) for i, new in enumerate((3, 5, 2)))
    step = 0
    while engine.running or engine.waiting:
        assert step < 20
        clock[0] = step + 1.0
        engine.step()
        step += 1
    stamps = [(r.queued, r.scheduled, r.first_token, r.last_token) for r in (a, b, c)]
    assert stamps == [(0, 1, 1, 3), (0, 1, 1, 5), (0, 4, 4, 5)]


def test_a_preempted_request_keeps_its_first_admission_as_vllm_does(one_thread, monkeypatch):
    """A request preempted and readmitted later keeps its first scheduled stamp (vLLM's: the wait for its recompute
    counts in its prefill or decode time, not its queue time); every request's stamps stay in order."""
    clock = fake_clock(monkeypatch)
    engine = Engine(tiny(), max_batch=5, kv_pages=10, page_size=4)
    handles = [engine.submit(idx, new, **seeded(kw)) for idx, new, kw in PREEMPTING]
    first, preempted, step = {}, set(), 0
    while engine.running or engine.waiting:
        assert step < 200
        clock[0] = step + 1.0
        engine.step()
        step += 1
        for i, h in enumerate(handles):
            if h.slots is not None:
                first.setdefault(i, clock[0])
            elif i in first and h in engine.waiting:
                preempted.add(i)
    assert preempted and engine.stats["preemptions"] > 0
    for i, h in enumerate(handles):
        assert h.scheduled == first[i] and h.queued == 0
        assert h.scheduled <= h.first_token <= h.last_token


# -- prompt logprobs (vLLM's SamplingParams.prompt_logprobs; serve's echo): scored by the request's own prefill ----
def scored_prompt(model, idx, k):
    """A float64 copy of model's (logprob of each next token [T - 1], top ids, top logprobs [T - 1, k]) of idx's
    first row, from one forward of the whole prompt."""
    import copy

    ref = copy.deepcopy(model).double().set_kernels("reference")
    with torch.no_grad():
        logp = torch.log_softmax(ref(idx[:1])[0, :-1], dim=-1)
    top = torch.topk(logp, k, dim=-1)
    return logp.gather(-1, idx[0, 1:, None])[:, 0], top.indices, top.values


def check_scored(got, want, tol=1e-4, name="prompt logprobs", ids=True):
    """One "prompt" item's rows against scored_prompt's: the same top ids (not with ids False: an int8 cache's
    rounding may swap two near-tied ones), the logprobs to tol."""
    assert not ids or torch.equal(got[1], want[1]), f"{name}: top ids differ"
    assert_close_rel(got[0], want[0], tol, name)
    assert_close_rel(got[2], want[2], tol, name + " (top)")


def prefill_shapes(monkeypatch, engine):
    """The ids' shape of each of the engine's prefill forwards (model.hidden outside its decode), a list that grows."""
    shapes, hidden, decode, decoding = [], engine.model.hidden, engine._decode, [False]

    def spied(ids, cache=None, *a, **k):
        if not decoding[0]:
            shapes.append(tuple(ids.shape))
        return hidden(ids, cache, *a, **k)

    def spied_decode(rows):
        decoding[0] = True
        try:
            return decode(rows)
        finally:
            decoding[0] = False
    monkeypatch.setattr(engine.model, "hidden", spied)
    monkeypatch.setattr(engine, "_decode", spied_decode)
    return shapes


@pytest.mark.parametrize("kernels,kv_dtype", [("reference", "auto"), ("reference", "int8"), ("triton", "auto")])
def test_prompt_logprobs_come_from_the_requests_own_prefill(one_thread, monkeypatch, kernels, kv_dtype):
    """A (2 equal rows of 11, sampled, max_prefill_tokens 4: chunks of 4 + 4 + 3) scores its prompt in its prefill:
    10 rows (each chunk's last position scoring the next chunk's first token) against a float64 forward of the
    whole prompt, handed once before any token, its prompt prefilled once (the 11 positions, no second forward),
    its tokens still generate()'s; B (4, running) decodes beside it. Both paths, an int8 cache (its rounding: 1e-3)."""
    model = loud_attention(tiny(kernels, n_layer=2 if kernels == "reference" else 1, n_kv_head=1))
    a, kw = prompt(11, 2, seed=3), dict(temperature=1.0, seed=4)
    want = scored_prompt(model, a, 3)
    engine = Engine(model, max_batch=3, kv_pages=12, page_size=4, max_prefill_tokens=4, kv_cache_dtype=kv_dtype)
    hb = engine.submit(prompt(4, seed=1), 6)
    engine.step()
    seen = prefill_shapes(monkeypatch, engine)
    ha = engine.submit(a, 3, prompt_logprobs=3, **seeded(kw))
    while engine.running or engine.waiting:
        engine.step()
    monkeypatch.undo()
    assert seen == [(1, 4), (1, 4), (1, 3)]  # A's prompt once, in chunks (its equal rows once)
    order = []
    out = ha.wait(lambda nxt: order.append("token"), on_prompt=lambda rows: order.append(rows))
    assert order[1:] == ["token"] * 3 and len(order[0][0]) == 10
    check_scored(order[0], want, 1e-3 if kv_dtype == "int8" else 1e-4, f"{kernels} {kv_dtype}", kv_dtype != "int8")
    assert torch.equal(out, alone(model.set_kernels("reference"), a, 3, kw, kv_cache_dtype=kv_dtype))
    assert torch.equal(hb.wait(), alone(model, prompt(4, seed=1), 6, {}, kv_cache_dtype=kv_dtype))


@pytest.mark.parametrize("kw", [{}, dict(max_prefill_tokens=3)])
def test_a_preempted_request_scores_its_prompt_once(one_thread, kw):
    """PREEMPTING's B (2 equal rows, sampled) and D (the latest admitted: preempted first) score their prompts:
    each hands its rows once, the float64 forward's, though preempted and recomputed (after its prefill, or with
    chunks of 3 also in the middle of it: the parts scored before dropped, scored again), and draws generate()'s
    tokens alone."""
    model = loud_attention(tiny())
    requests = [(idx, new, dict(settings, prompt_logprobs=2) if i in (1, 3) else settings)
                for i, (idx, new, settings) in enumerate(PREEMPTING)]
    engine = Engine(model, max_batch=5, kv_pages=10, page_size=4, **kw)
    handles = [engine.submit(idx, new, **seeded(settings)) for idx, new, settings in requests]
    preempted, steps = set(), 0  # (whether a scoring request was preempted before its prompt was scored, or after)
    while engine.running or engine.waiting:
        assert steps < 200
        engine.step()
        steps += 1
        preempted |= {h.scoring for h in handles if h.prompt_logprobs is not None and h in engine.waiting}
    assert preempted == ({False, True} if kw else {False})
    for h, (idx, new, settings) in zip(handles, requests):
        rows = []
        out = h.wait(on_prompt=rows.append)
        assert torch.equal(out, alone(model, idx, new, {k: v for k, v in settings.items() if k != "prompt_logprobs"}))
        assert len(rows) == (h.prompt_logprobs is not None)
        for got in rows:
            check_scored(got, scored_prompt(model, idx, 2))


def test_a_prefill_only_request_scores_its_prompt_and_ends(one_thread, monkeypatch):
    """max_new_tokens 0 with prompt_logprobs (echo with max_tokens 0): the request runs (counted running while it
    prefills, in chunks of 4), hands its rows, ends with its prompt after its last chunk, nothing drawn, stamped
    there as first and last token (vLLM draws one token for it and drops it); without prompt_logprobs it ends at
    once, nothing run. A prompt of one token scores nothing. Unequal rows, and a prompt token past vocab_limit, are
    refused by name."""
    clock = fake_clock(monkeypatch)
    model = loud_attention(tiny())
    a = prompt(9, seed=2)
    engine = Engine(model, max_batch=2, kv_pages=3, page_size=4, max_prefill_tokens=4)
    assert engine.submit(a, 0).queue.get_nowait() == ("end", a)
    h, one = engine.submit(a, 0, prompt_logprobs=1), engine.submit(a[:, :1], 0, prompt_logprobs=1)
    running = []
    while engine.running or engine.waiting:
        clock[0] += 1.0
        engine.step()
        running.append(h in engine.running)
    assert running == [True, True, False, False] and (h.scheduled, h.first_token, h.last_token) == (1, 3, 3)
    rows = []
    assert torch.equal(h.wait(lambda *a: rows.append("token"), on_prompt=rows.append), a) and len(rows) == 1
    check_scored(rows[0], scored_prompt(model, a, 1))
    assert torch.equal(one.wait(on_prompt=rows.append), a[:, :1]) and [len(x) for x in rows[1]] == [0] * 4
    assert engine.free == [0, 1] and engine.cache.num_free == 3
    with pytest.raises(UserError, match="prompt_logprobs scores one prompt: a request's rows must all be that"):
        engine.submit(torch.cat([a[:, :3], prompt(3, seed=3)]), 2, prompt_logprobs=1)
    # a prompt token past vocab_limit has no logprob among the tokens drawn from (it failed in the prefill's gather)
    with pytest.raises(UserError, match=f"prompt_logprobs: the prompt's token id {int(a.max())} is not among the "
                                        f"vocab_limit {int(a.max())}"):
        engine.submit(a, 1, prompt_logprobs=1, vocab_limit=int(a.max()))


@pytest.mark.parametrize("pages", [{}, dict(kv_pages=14, page_size=4)])
def test_a_prefill_only_request_of_the_whole_context_leaves_the_decode_step_alone(one_thread, pages):
    """A prefill-only request whose prompt fills the context (40) ends in the step its prefill does, in a slot below
    B's, which decodes in that very step: that decode must not run its row at position 40 (past the positional
    embedding: B failed with an IndexError); B gets generate()'s tokens, both caches."""
    model = tiny(n_layer=1)
    engine = Engine(model, max_batch=2, **pages)
    hc, hb = engine.submit(prompt(3, seed=3), 1), engine.submit(prompt(5, seed=2), 6)
    engine.step()  # C (slot 0) ends, B (slot 1) decodes on
    ha = engine.submit(prompt(40, seed=1), 0, prompt_logprobs=1)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(hb.wait(), alone(model, prompt(5, seed=2), 6, {}))
    assert torch.equal(ha.wait(), prompt(40, seed=1)) and hc.slots is None and engine.free == [0, 1]


def test_a_request_scoring_its_prompt_reads_no_cached_prefix_but_caches_its_pages(one_thread, monkeypatch):
    """Prefix caching (vLLM's rule: positions read from cached pages have no forward to score them): B scores the
    prompt A prefilled and prefills all its 10 tokens, its rows the float64 forward's; C, the same prompt after it,
    reads the 2 full pages back. The stats count the prompts looked up in the cache (A's and C's), as vLLM's."""
    model = loud_attention(tiny())
    p = prompt(10, seed=5)
    engine = Engine(model, max_batch=1, kv_pages=6, page_size=4, prefix_caching=True)
    seen = prefill_shapes(monkeypatch, engine)
    handles = [engine.submit(p, 2), engine.submit(p, 1, prompt_logprobs=2), engine.submit(p, 2)]
    while engine.running or engine.waiting:
        engine.step()
    monkeypatch.undo()
    assert seen == [(1, 10), (1, 10), (1, 2)]
    rows = []
    assert torch.equal(handles[1].wait(on_prompt=rows.append), alone(model, p, 1, {}))
    check_scored(rows[0], scored_prompt(model, p, 2))
    assert engine.stats == {"prompt_tokens": 20, "cached_prompt_tokens": 8, "preemptions": 0}
    for h in (handles[0], handles[2]):
        assert torch.equal(h.wait(), alone(model, p, 2, {}))


# -- batched prefill: a step's prompt chunks of several requests in one forward, right-padded to the longest -------
# A (7, greedy), B (2 equal rows of 5, sampled: prefilled once), C (6, scoring its prompt), D (4, prefill-only,
# scoring): 22 prompt tokens in one forward of 4 rows of 7 (28 <= a GPU's 1.5 x 22), in slots 0, 3, 1, 4 by length
BURST = [(prompt(7, seed=11), 5, dict(logprobs=2)), (prompt(5, 2, seed=12), 4, dict(SAMPLED, seed=3, logprobs=2)),
         (prompt(6, seed=13), 2, dict(prompt_logprobs=3, logprobs=1)), (prompt(4, seed=14), 0, dict(prompt_logprobs=2))]


@pytest.mark.parametrize("kernels,kv_dtype,pages", [("reference", "auto", None), ("reference", "auto", 20),
                                                    ("reference", "int8", None), ("triton", "auto", 20),
                                                    ("triton", "auto", None)])
def test_a_burst_of_prompts_prefills_in_one_forward_and_each_gets_generates_tokens(one_thread, monkeypatch, kernels,
                                                                                   kv_dtype, pages):
    """BURST's four requests, submitted at once, prefill in ONE forward (their rows' slots not consecutive: a slot
    cache reads them through its row index, a paged one through its table); each still draws generate()'s tokens
    alone with its logprobs (the first from its prefill's last real position, not its padding), and C's and D's
    prompt logprobs are the float64 forward's (both paths, both caches, an int8 one)."""
    model = loud_attention(tiny(kernels, n_layer=2 if kernels == "reference" else 1, n_kv_head=1))
    paging = {} if pages is None else dict(kv_pages=pages, page_size=4)
    engine = Engine(model, max_batch=5, kv_cache_dtype=kv_dtype, **paging)
    monkeypatch.setitem(PREFILL_PAD, "cpu", PREFILL_PAD["cuda"])  # (a GPU's rule: the rows padded up to 7)
    shapes = prefill_shapes(monkeypatch, engine)
    handles = [engine.submit(idx, new, **seeded(kw)) for idx, new, kw in BURST]
    while engine.running or engine.waiting:
        engine.step()
    monkeypatch.undo()
    assert shapes == [(4, 7)] and [h.slots for h in handles[:3]] == [None] * 3
    tol = 1e-3 if kv_dtype == "int8" else 1e-4
    model.set_kernels("reference")  # (generate() alone: as check's reference_alone)
    for h, (idx, new, kw) in zip(handles, BURST):
        rows, got, want = [], [], []
        out = h.wait(lambda *a: got.append(a), on_prompt=rows.append)
        k = kw.get("prompt_logprobs")
        assert torch.equal(out, idx if new == 0 else alone(
            model, idx, new, {x: v for x, v in kw.items() if x != "prompt_logprobs"}, kv_cache_dtype=kv_dtype,
            on_token=lambda *a: want.append(a)))
        assert len(got) == len(want) == new
        for (_, lp), (_, lp_) in zip(got, want):
            assert_close_rel(lp[0], lp_[0], tol, "the drawn tokens' logprobs")
        if k is not None:
            check_scored(rows[0], scored_prompt(model, idx, k), tol, f"{kernels} {kv_dtype}", kv_dtype != "int8")
    assert engine.free == list(range(5)) and not engine.running


def test_a_batched_prefill_groups_like_lengths_and_keeps_every_row_within_the_context(one_thread, monkeypatch):
    """A prompt of 2 and one of 12 prefill apart (padding 2 to 12 would compute 24 positions for 14), and a chunk
    near the context's end apart from a longer one: E (39 of the 40 positions) finds 36 cached and prefills 3 at
    36..38, F (6, fresh) beside it would pad E's row to 36 + 6 = 42 > 40. Each gets generate()'s tokens."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=3, kv_pages=30, page_size=4, prefix_caching=True)
    monkeypatch.setitem(PREFILL_PAD, "cpu", PREFILL_PAD["cuda"])  # (E and F within a GPU's padding rule)
    shapes = prefill_shapes(monkeypatch, engine)
    e = prompt(39, seed=21)
    first = [(prompt(2, seed=22), 3, {}), (prompt(12, seed=23), 3, {}), (e, 1, {})]
    handles = [engine.submit(idx, new) for idx, new, _ in first]
    while engine.running or engine.waiting:
        engine.step()
    assert shapes == [(1, 39), (1, 12), (1, 2)]
    then = [(e, 1, {}), (prompt(6, seed=24), 4, {})]
    handles += [engine.submit(idx, new) for idx, new, _ in then]
    shapes.clear()
    while engine.running or engine.waiting:
        engine.step()
    monkeypatch.undo()
    assert shapes == [(1, 6), (1, 3)] and engine.stats["cached_prompt_tokens"] == 36
    for h, (idx, new, kw) in zip(handles, first + then):
        assert torch.equal(h.wait(), alone(model, idx, new, kw))


def test_a_gpus_padding_rule_groups_more_than_a_cpus(one_thread, monkeypatch):
    """Chunks of 10, 10, 9 and 6 tokens (fresh prompts): on a CPU (padding at most 1.1 times the real tokens) the
    three near-equal ones go together and the 6 alone; by the cache's device type, a GPU's rule (1.5) puts all four
    in one forward."""
    engine = Engine(tiny(), max_batch=4)
    chunks = [Chunk(None, 0, slot, 0, n) for slot, n in enumerate((9, 10, 6, 10))]
    assert [[c.end for c in g] for g in engine._groups(chunks)] == [[10, 10, 9], [6]]
    engine.cache.k = engine.cache.k.to("meta")  # (a device of another type: only the type is read)
    monkeypatch.setitem(PREFILL_PAD, "meta", PREFILL_PAD["cuda"])
    assert [[c.end for c in g] for g in engine._groups(chunks)] == [[10, 10, 9, 6]]


# One group of each model variant the engine takes, its rows' slots out of order, a padded row ending on the
# context's last position (learned positions: the table's last row; ALiBi, RoPE, a window: each row's own offsets)
VARIANTS = {"gpt2": {}, "rope-gqa": dict(position_encoding="rope", n_kv_head=1, norm="rmsnorm", mlp="swiglu"),
            "alibi": dict(position_encoding="alibi"), "window-softcap": dict(attention_window=4, attn_softcap=5.0),
            "moe": dict(position_encoding="rope", norm="rmsnorm", mlp="swiglu", n_experts=4, experts_per_token=2),
            "parallel": dict(parallel_residual=True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_group_of_every_model_variant_draws_generates_tokens_up_to_the_contexts_end(one_thread, monkeypatch,
                                                                                      variant):
    """E (39 of the 40 positions) runs once, caching 36; then D decodes while E again (36 cached: 3 at 36..38),
    F (4, scoring its prompt) and G (2 equal rows of 4, sampled) prefill in ONE forward of 3 rows of 4, in slots
    2, 3, 1 (F, G, E: longest first): E's padding is at position 39, the context's last. Each request draws
    generate()'s tokens alone, F's prompt logprobs are the float64 forward's, and every slot and page is free at
    the end."""
    model = loud_attention(tiny(**VARIANTS[variant]))
    engine = Engine(model, max_batch=5, kv_pages=40, page_size=4, prefix_caching=True)
    monkeypatch.setitem(PREFILL_PAD, "cpu", PREFILL_PAD["cuda"])  # (a GPU's padding rule)
    shapes = prefill_shapes(monkeypatch, engine)
    e = prompt(39, seed=31)
    schedule = [(0, e, 1, {}), (1, prompt(5, seed=32), 6, {}), (2, e, 1, {}),
                (2, prompt(4, seed=33), 3, dict(prompt_logprobs=2)),
                (2, prompt(4, 2, seed=34), 4, dict(SAMPLED, seed=5))]
    out = run(engine, schedule)
    monkeypatch.undo()
    assert (3, 4) in shapes and engine.stats["cached_prompt_tokens"] == 36
    for (h, _), (_, idx, new, kw) in zip(out, schedule):
        rows = []
        assert torch.equal(h.wait(on_prompt=rows.append),
                           alone(model, idx, new, {x: v for x, v in kw.items() if x != "prompt_logprobs"}))
        if "prompt_logprobs" in kw:
            check_scored(rows[0], scored_prompt(model, idx, 2), 1e-4, variant)
    assert engine.free == list(range(5)) and engine.cache.num_free == 40 and not any(engine.cache.refs)


def test_a_group_whose_forward_fails_fails_its_requests_alone(one_thread, monkeypatch):
    """D decodes while C (16) prefills alone and A (5) and B (4) in a forward of their own (C's padding would
    double their 9 tokens), which raises after writing its keys: A and B get the error, C and D generate()'s
    tokens; every slot and page is free, and A submitted again reads none of its failed prefill's keys."""
    model = loud_attention(tiny())
    engine = Engine(model, max_batch=4, kv_pages=24, page_size=4, prefix_caching=True)
    monkeypatch.setitem(PREFILL_PAD, "cpu", PREFILL_PAD["cuda"])  # (a GPU's padding rule)
    shapes, hidden = prefill_shapes(monkeypatch, engine), engine.model.hidden  # (the spy: it records, then runs)

    def failing(ids, cache=None, *a, **k):
        out = hidden(ids, cache, *a, **k)
        if ids.shape == (2, 5):
            raise RuntimeError("the group's forward failed")
        return out
    monkeypatch.setattr(engine.model, "hidden", failing)
    a, b, c, d = prompt(5, seed=41), prompt(4, seed=42), prompt(16, seed=43), prompt(6, seed=44)
    out = run(engine, [(0, d, 5, {}), (1, c, 3, dict(SAMPLED, seed=2)), (1, a, 3, {}), (1, b, 2, {})])
    assert shapes == [(1, 6), (1, 16), (2, 5)]
    for h, _ in out[2:]:
        with pytest.raises(RuntimeError, match="the group's forward failed"):
            h.wait()
    assert torch.equal(out[0][0].wait(), alone(model, d, 5, {}))
    assert torch.equal(out[1][0].wait(), alone(model, c, 3, dict(SAMPLED, seed=2)))
    assert engine.free == [0, 1, 2, 3] and engine.cache.num_free == 24 and not any(engine.cache.refs)
    monkeypatch.undo()
    again = engine.submit(a, 3)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(again.wait(), alone(model, a, 3, {}))


def test_cuda_graph_decode_steps_read_the_rows_a_batched_prefill_wrote(one_thread, monkeypatch):
    """A, W and Y prefill together into slots 0..2 and decode in bucket 4's graph; W ends, and B and C (sampled)
    prefill in one forward into slots 3 and 1 (not consecutive: through the slot cache's row index) while A and Y
    replay the graph captured before, which then runs all four: each request draws generate()'s tokens alone (the
    graph reads the fills and keys the prefill left, in place, never a copy)."""
    model = loud_attention(tiny())
    log = []
    engine = graphed(model, log)
    monkeypatch.setitem(PREFILL_PAD, "cpu", PREFILL_PAD["cuda"])  # (a GPU's padding rule)
    shapes = prefill_shapes(monkeypatch, engine)
    schedule = [(0, prompt(4, seed=51), 7, {}), (0, prompt(3, seed=52), 2, {}), (0, prompt(5, seed=53), 7, {}),
                (2, prompt(5, seed=54), 3, dict(SAMPLED, seed=7)), (2, prompt(6, seed=55), 4, {})]
    out = run(engine, schedule)
    monkeypatch.undo()
    assert shapes == [(3, 5), (2, 6)] and [at for _, at in out] == [0, 0, 0, 2, 2]
    assert buckets_run(log) == [(4, True)]
    for (h, _), (_, idx, new, kw) in zip(out, schedule):
        assert torch.equal(h.wait(), alone(model, idx, new, kw))


def engine_lines(engine) -> int:
    """The lines of train/engine.py one engine.step() runs (sys.settrace's line events: a comprehension's every
    item too): a count of the step's Python work that no machine's speed changes."""
    import sys

    import tritongpt.train.engine as engine_module
    count = [0]

    def local(frame, event, arg):
        count[0] += event == "line"
        return local

    old = sys.gettrace()
    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename == engine_module.__file__ else None)
    try:
        engine.step()
    finally:
        sys.settrace(old)
    return count[0]


@pytest.mark.parametrize("pages", [None, 72])
def test_an_admission_steps_python_work_grows_linearly_with_its_requests(one_thread, pages):
    """A step admitting and prefilling a burst of N equal prompts (one batched forward) runs a + b N lines of the
    engine, not a + b N + c N^2: its second difference over N = 8, 16, 24 is 0 (a few lines allowed). It was 192:
    _groups summed its group's tokens again for each chunk joining it, and _prefill scanned the step's chunks for
    each request."""
    def lines(N):
        engine = Engine(tiny(n_layer=1), max_batch=N, **({} if pages is None else dict(kv_pages=pages, page_size=4)))
        for j in range(N):
            engine.submit(prompt(6, seed=j), 3)
        return engine_lines(engine)

    a, b, c = (lines(N) for N in (8, 16, 24))
    assert abs(c - 2 * b + a) <= 8, (a, b, c)


def test_a_step_ending_many_requests_scans_the_running_list_once(one_thread):
    """A step whose 12 requests all end frees them together (_finish_all): no list.remove (a scan of the running
    list) nor a sort of the free slots a request, the step's requests squared; and the engine is left as before,
    every slot free in order, nothing running."""
    import sys

    import tritongpt.train.engine as engine_module
    engine = Engine(tiny(n_layer=1), max_batch=12)
    for j in range(12):
        engine.submit(prompt(5, seed=j), 2)
    engine.step()
    assert len(engine.running) == 12
    calls = []
    old = sys.getprofile()
    sys.setprofile(lambda frame, event, arg: calls.append(arg.__name__) if event == "c_call" and
                   frame.f_code.co_filename == engine_module.__file__ else None)
    try:
        engine.step()
    finally:
        sys.setprofile(old)
    assert not engine.running and engine.free == list(range(12))
    # (the sorts: _groups' of the step's prefill chunks, none, and the free slots' once)
    assert calls.count("remove") == 0 and calls.count("sorted") + calls.count("sort") <= 2, calls


def test_a_failure_letting_go_of_ending_requests_leaves_none_waiting_for_ever(one_thread):
    """A step ending 3 requests together whose second's release fails (injected: the engine's own fault, _loop's to
    handle): the first, let go, gets its ids, the second and third the error; none is left out of the running list
    untold (its wait() hung for ever: _finish_all had taken them all out, and told none), and the engine serves on."""
    engine = Engine(tiny(n_layer=1), max_batch=3)
    handles = [engine.submit(prompt(4, seed=j), 2) for j in range(3)]
    real = engine._cache_fed

    def failing(r):
        if r is handles[1]:
            raise RuntimeError("a broken release")
        real(r)
    engine._cache_fed = failing
    engine.start()
    try:
        out = []

        def wait_all():
            for h in handles:
                try:
                    out.append(h.wait(poll=0.01))
                except RuntimeError as e:
                    out.append(e)
        t = threading.Thread(target=wait_all, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "a request's wait() hung"
        assert torch.equal(out[0], generate(engine.model, prompt(4, seed=0), 2))
        assert all(isinstance(e, RuntimeError) and "a broken release" in str(e) for e in out[1:]), out
        engine._cache_fed = real
        assert torch.equal(engine.submit(prompt(4, seed=5), 2).wait(),
                           generate(engine.model, prompt(4, seed=5), 2))
    finally:
        engine.close()



def decode_ops(engine) -> int:
    """The torch ops one engine.step() dispatches outside the model's forward (its hidden states and LM head)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops, inside = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not self.inside
            return func(*args, **(kwargs or {}))

    count, model = Count(), engine.model
    for name in ("hidden", "logits"):
        def paused(*a, _real=getattr(model, name), **k):
            count.inside += 1
            try:
                return _real(*a, **k)
            finally:
                count.inside -= 1
        setattr(model, name, paused)
    try:
        with count:
            engine.step()
    finally:
        del model.hidden, model.logits
    return count.ops


def test_a_decode_steps_torch_ops_a_request_stay_few(one_thread):
    """A decode step of N greedy one-row requests with an EOS dispatches 4 torch ops a request outside the forward
    (N = 8 to 16; on a GPU the ones that are not views are launches): its last token's slice, its logits' rows of the
    batch's (a view, not a gather), its drawn token's slice and its ids' cat. It was 7: an index (and its index
    tensor) a request for its logits' rows, and an alias of them for each of the draw and the post-draw."""
    def ops(N):
        engine = Engine(tiny(n_layer=1), max_batch=N)
        for j in range(N):
            engine.submit(prompt(5, seed=j), 6, eos_id=VOCAB - 1, ignore_eos=True)
        engine.step()  # (the prefill and first token)
        engine.step()
        return decode_ops(engine)

    assert ops(16) - ops(8) <= 4 * 8


def test_a_request_in_slots_apart_draws_generates_tokens(one_thread, monkeypatch):
    """rows_of's gather: a request of 2 rows admitted into slots 0 and 3 (the first request's, freed, and the last
    free one) draws, seeded, with its penalties and logprobs asked, generate()'s tokens for it alone, beside
    requests whose rows are views."""
    import tritongpt.train.engine as engine_module

    seen, real = [], engine_module.rows_of
    monkeypatch.setattr(engine_module, "rows_of", lambda out, slots: seen.append(list(slots)) or real(out, slots))
    model = tiny()
    schedule = [(0, prompt(5, seed=1), 2, {}), (0, prompt(6, seed=2), 9, dict(SAMPLED, seed=3)),
                (0, prompt(4, seed=4), 9, {}), (3, prompt(5, 2, seed=5), 6, dict(SAMPLED, seed=6, logprobs=2))]
    check(model, schedule, Engine(model, max_batch=4))
    assert [0, 3] in seen
