"""Draft-model speculation in the batching engine (train/engine.py, Engine(draft=small, num_draft_tokens=K)): each
request's tokens are generate(draft=small, num_draft_tokens=K)'s for it alone (greedy, and seeded samples with
penalties: the same generator use, so their distribution is the one generate's draws have, test_speculative's),
requests of different lengths and n arriving at different steps, EOS and stop rules, slot and paged caches
(preempting: a readmitted request's draft rows prefilled again), a draft of a shorter context; fewer forwards than
tokens with a good draft; what decodes plainly and what is refused."""
import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.engine import Engine
from tritongpt.train.generate import Prediction, PromptLookup, generate

from parity import loud_attention
from test_engine import SAMPLED, VOCAB, check, prompt, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
K = 3


@pytest.fixture(scope="module")
def model():
    return loud_attention(tiny(), gain=2.0)


@pytest.fixture(scope="module")
def draft(model):
    return first_block(model)


def first_block(model, context=24):
    """The model's first block alone, its context 24 (the model's 40): it agrees with the model on some tokens
    (its proposals partly accepted), and its k is cut where a text outgrows its context."""
    cfg = model.config
    small = GPTModel(GPTConfig(vocab_size=cfg.vocab_size, context_length=context, n_embd=cfg.n_embd, n_layer=1,
                               n_head=cfg.n_head, tie_weights=False)).eval()
    state = {k: v[:context] if k == "pos_emb.weight" else v for k, v in model.state_dict().items()}
    small.load_state_dict(state, strict=False)
    return small


def schedule_of(model, draft):
    """A (greedy, its EOS a token it draws mid-text), B (2 sampled rows, penalties), C (2 greedy rows of different
    prompts) arriving at step 2 with a stop rule, D (a 1-token prompt: nothing to prefill) at step 3, E (long: past
    the draft's context midway) at step 4."""
    spec = dict(draft=draft, num_draft_tokens=K)
    a, c = prompt(5, seed=1), torch.cat([prompt(6, seed=3), prompt(6, seed=7)])
    eos = int(generate(model, a, 10, **spec)[0, -1])
    last = int(generate(model, c, 8, **spec)[1, -1])
    assert eos not in generate(model, a, 9)[0, 5:].tolist() and last not in generate(model, c, 7)[1, 6:].tolist()
    return [(0, a, 14, dict(eos_id=eos)), (0, prompt(9, 2, seed=2), 8, dict(SAMPLED, seed=5)),
            (2, c, 12, dict(stop=lambda idx: idx[:, -1] == last)), (3, prompt(1, seed=4), 6, dict(temperature=1.0,
                                                                                               seed=9)),
            (4, prompt(18, seed=6), 12, {})]


@pytest.mark.parametrize("kw", [{}, dict(kv_pages=16, page_size=4), dict(kv_cache_dtype="int8"),
                                dict(kv_pages=40, page_size=4, prefix_caching=True, max_prefill_tokens=3)],
                         ids=["slots", "paged-preempting", "int8", "prefix-caching-chunked"])
def test_requests_get_generates_draft_tokens(model, draft, kw):
    """(int8: the model's cache, as generate's, the draft's not; prefix caching and chunked prefill: the model's
    prompts prefilled 3 tokens a step, the draft's at each request's first decode step)"""
    engine = Engine(model, max_batch=5, draft=draft, num_draft_tokens=K, **kw)
    check(model, schedule_of(model, draft), engine, draft=draft, num_draft_tokens=K,
          kv_cache_dtype=kw.get("kv_cache_dtype", "auto"))
    s = engine.stats
    assert 0 < s["spec_decode_num_accepted_tokens"] < s["spec_decode_num_draft_tokens"]
    assert s["spec_decode_num_drafts"] > 0
    if "kv_pages" in kw:
        assert sorted(engine.cache.free) == list(range(kw["kv_pages"]))
        assert s["preemptions"] > 0 or kw.get("prefix_caching")


def test_the_model_as_its_own_draft_takes_fewer_forwards_than_tokens(model):
    """Every proposal accepted: K + 1 tokens a verification forward, the text still generate()'s."""
    engine = Engine(model, max_batch=2, draft=model, num_draft_tokens=4)
    idx = torch.cat([prompt(7, seed=1), prompt(7, seed=2)])
    h, steps = engine.submit(idx, 20), 0
    while engine.running or engine.waiting:
        engine.step()
        steps += 1
    assert torch.equal(h.wait(), generate(model, idx, 20))
    s = engine.stats
    # (a prefill, then 5 tokens a step: 20 in 4, each row's 4 proposals a step all kept: 2 x 4 x 4 = 32)
    assert s["spec_decode_num_accepted_tokens"] == s["spec_decode_num_draft_tokens"] == 32
    assert s["spec_decode_num_drafts"] == 8 and steps == 1 + 4


def test_max_len_shortens_the_rows_the_draft_s_too(model):
    """Engine(max_len=20) (serve's --max-model-len) on the 40-position model, itself its draft: both caches' rows are
    20 long, a request filling them exactly speculates to its end and gets generate()'s tokens (the last steps' k
    cut by 20, not by 40), one position more is refused, as is a max_len past the model's context."""
    engine = Engine(model, max_batch=2, draft=model, num_draft_tokens=4, max_len=20)
    assert engine.max_len == engine.draft_cache.max_len == engine.cache.k.size(3) == 20
    idx = prompt(7, seed=1)
    h = engine.submit(idx, 13)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(h.wait(), generate(model, idx, 13)) and engine.stats["spec_decode_num_drafts"] > 0
    with pytest.raises(UserError, match="the context length 20"):
        engine.check_room(1, 7, 14)
    for bad in (0, 41, 1.5):
        with pytest.raises(UserError, match="max_len must be a positive integer of at most the model's context "
                                            r"length \(40\)"):
            Engine(model, max_batch=2, max_len=bad)


def test_requests_that_cannot_speculate_decode_plainly(model, draft):
    engine = Engine(model, max_batch=3, draft=draft, num_draft_tokens=K)
    a, b = prompt(8, seed=1), prompt(7, seed=2)
    got = []
    ha = engine.submit(a, 6, logprobs=1)
    hb = engine.submit(b, 6, eos_id=3, min_tokens=4)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(ha.wait(lambda nxt, lp: got.append(lp)), generate(model, a, 6)) and len(got) == 6
    assert torch.equal(hb.wait(), generate(model, b, 6, eos_id=3, min_tokens=4))
    assert engine.stats["spec_decode_num_drafts"] == 0


def test_what_the_engine_refuses_with_a_draft(model, draft):
    with pytest.raises(UserError, match="draft and prompt_lookup are two drafts"):
        Engine(model, draft=draft, prompt_lookup=2)
    torch.manual_seed(0)
    other = GPTModel(GPTConfig(vocab_size=VOCAB + 1, context_length=24, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UserError, match=f"vocabulary has {VOCAB + 1} tokens, the model's {VOCAB}"):
        Engine(model, draft=other)
    with pytest.raises(UserError, match="num_draft_tokens must be a positive integer"):
        Engine(model, draft=draft, num_draft_tokens=0)
    with pytest.raises(UserError, match="the draft model is on meta, the model on cpu"):
        Engine(model, draft=first_block(model).to("meta"))
    # not a model (a draft of generate's that runs no forward, a path): refused by name, not an AttributeError
    for other, name in ((PromptLookup(2), "PromptLookup"), (Prediction([1, 2]), "Prediction"), ("draft.pt", "str")):
        with pytest.raises(UserError, match=f"draft must be a model .*got {name}"):
            Engine(model, draft=other)
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    other = GPTModel(GPTConfig(vocab_size=VOCAB, context_length=24, n_embd=16, n_layer=1, n_head=1,
                               position_encoding="rope", rope_scaling=longrope))
    with pytest.raises(UserError, match="the draft model: the batching engine does not take LongRoPE models"):
        Engine(model, draft=other)


def test_a_preempted_request_prefills_its_draft_rows_again(model, draft):
    """A (2 sampled rows) preempted mid-text, its draft rows scribbled over while it waits (another request's, as
    they would be): readmitted, it prefills them again and samples on as generate(draft=...) does."""
    from test_engine import seeded
    engine = Engine(model, max_batch=2, kv_pages=20, page_size=4, draft=draft, num_draft_tokens=K)
    a, kw = prompt(6, 2, seed=2), dict(SAMPLED, seed=3)
    h = engine.submit(a, 14, **seeded(kw))
    while h.idx.size(1) < 6 + 5:
        engine.step()
    slots = h.slots
    engine._preempt(h)
    for buf in (engine.draft_cache.k, engine.draft_cache.v):
        buf[:, slots] = torch.randn_like(buf[:, slots])
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(h.wait(), generate(model, a, 14, **seeded(kw), draft=draft, num_draft_tokens=K))
    assert engine.stats["preemptions"] == 1


def test_a_guided_sampled_request_drafts_under_its_grammar():
    """Structured outputs: the draft's logits masked by the grammar after the drafts before them (Guide.mask_after,
    as _speculative's), the verification masked too; a sampled guided request is generate(draft=...)'s."""
    from test_structured import CORPUS, SPECS
    from tritongpt.train.structured import Grammars
    from tritongpt.train.tokenizer import BPETokenizer
    tok = BPETokenizer.train(CORPUS, 300)
    torch.manual_seed(3)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=64, n_embd=32, n_layer=2, n_head=2,
                               tie_weights=False)).eval()
    small = first_block(model, 64)
    grammars = Grammars.of(tok, tok.vocab_size)
    idx = torch.tensor([tok.encode('{"name": "ab", "age": 12} {"name"')] * 2)
    kw = dict(eos_id=tok.eot_id, vocab_limit=tok.vocab_size, temperature=0.8)
    engine = Engine(model, max_batch=2, draft=small, num_draft_tokens=K)
    h = engine.submit(idx, 16, guide=grammars.guide(SPECS["json"]), generator=torch.Generator().manual_seed(4), **kw)
    while engine.running or engine.waiting:
        engine.step()
    assert torch.equal(h.wait(), generate(model, idx, 16, guide=grammars.guide(SPECS["json"]), draft=small,
                                          num_draft_tokens=K, generator=torch.Generator().manual_seed(4), **kw))
    assert engine.stats["spec_decode_num_accepted_tokens"] > 0
