"""Generation: cached == uncached, overflow of the context window, stopping, sampling filters."""
import math
import re

import numpy as np
import pytest
import torch

from parity import loud_attention
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
import tritongpt.train.generate as gen
from tritongpt.train.beam_search import beam_search
from tritongpt.train.generate import generate, held_back, sample_next, sampling_logits, step_logprobs


@pytest.fixture(scope="module")
def model():
    """Loud attention: cached and uncached tokens agree only if the cache holds the right keys and values."""
    torch.manual_seed(0)
    return loud_attention(GPTModel(GPTConfig(vocab_size=61, context_length=12, n_embd=32, n_layer=2, n_head=2))).eval()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, 5, None), (0.9, None, 0.8)])
def test_cached_equals_uncached_including_overflow(model, temperature, top_k, top_p):
    idx = torch.randint(0, 61, (3, 5))
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(7)
        # 5 prompt + 20 new tokens > context 12: the window must crop
        outs.append(generate(model, idx, 20, temperature, top_k, top_p, use_cache=use_cache, generator=g))
    assert outs[0].shape == (3, 25)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :5], idx)


def test_the_lm_head_reads_the_last_position_only_and_the_text_is_the_whole_forwards(model):
    """A prefill (the first step, a re-prefill of a full window, every step without a cache) runs the LM head on
    the last position alone, not on every prompt position (B x T x V logits, gigabytes for a long prompt on a large
    vocabulary); the tokens drawn equal a loop over the model's whole forward (greedy, cached and not, the window
    cropped past the context)."""
    idx = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(3))
    want = idx
    for _ in range(9):  # 7 + 9 > context 12
        want = torch.cat([want, model(want[:, -12:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    for use_cache in (True, False):
        seen = []
        hook = model.out_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
        try:
            out = generate(model, idx, 9, use_cache=use_cache)
        finally:
            hook.remove()
        assert torch.equal(out, want), use_cache
        assert seen == [1] * 9, (use_cache, seen)


def test_stops_at_end_of_text(model):
    idx = torch.randint(0, 61, (1, 4))
    first = generate(model, idx, 1)[0, -1].item()
    out = generate(model, idx, 10, eos_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first


class CountingModel(torch.nn.Module):
    """A stand-in model whose greedy next token is always (last token + 1) % vocab."""

    def __init__(self, vocab=10):
        super().__init__()
        self.vocab = vocab
        self.config = GPTConfig(vocab_size=vocab, context_length=32, n_embd=32, n_layer=1, n_head=1)

    def forward(self, idx, cache=None):
        return torch.nn.functional.one_hot((idx + 1) % self.vocab, self.vocab).float() * 10.0


def test_rows_that_finished_are_padded_with_eos():
    """A row that emitted eos keeps eos to the end while the other rows go on generating."""
    out = generate(CountingModel(), torch.tensor([[4, 5], [0, 1]]), 4, eos_id=7, use_cache=False)
    assert out.tolist() == [[4, 5, 6, 7, 7, 7], [0, 1, 2, 3, 4, 5]]
    assert generate(CountingModel(), torch.tensor([[4, 5]]), 4, eos_id=7, use_cache=False).tolist() == \
        [[4, 5, 6, 7]]  # every row done: stop early



def test_on_token_sees_each_steps_tokens_as_they_are_drawn():
    """on_token gets every step's [B, 1] tokens, the columns of the result in order (a finished
    row's eos padding too), and nothing after the last step."""
    seen = []
    out = generate(CountingModel(), torch.tensor([[4, 5], [0, 1]]), 4, eos_id=7, use_cache=False,
                   on_token=lambda new: seen.append(new.clone()))
    assert all(t.shape == (2, 1) for t in seen)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 2:])
    seen.clear()
    out = generate(CountingModel(), torch.tensor([[4, 5]]), 4, eos_id=7, use_cache=False, on_token=seen.append)
    assert [t.item() for t in seen] == [6, 7] == out[0, 2:].tolist()


def test_vocab_limit_never_draws_ids_past_it():
    """A tokenizer smaller than the model's vocabulary: ids >= vocab_limit are never drawn, greedy
    or sampled, even where the model's favourite is one of them (it was tested only for refusing
    a bad value: generating over the whole vocabulary passed)."""
    model = CountingModel(vocab=10)  # the favourite after 7 is 8, past the limit of 8
    assert generate(model, torch.tensor([[6]]), 4, use_cache=False, vocab_limit=8).tolist() == [[6, 7, 0, 1, 2]]
    g = torch.Generator().manual_seed(0)
    out = generate(model, torch.full((50, 1), 7), 3, temperature=1.0, use_cache=False, generator=g, vocab_limit=8)
    assert (out[:, 1:] < 8).all()


@pytest.mark.parametrize("temperature", [0.25, 4.0])
def test_temperature_divides_the_logits(temperature):
    """Sampled frequencies follow softmax(logits / T), within 5 standard errors."""
    n = 20_000
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    picks = sample_next(logits.expand(n, 5), temperature, generator=g).flatten()
    freq = torch.bincount(picks, minlength=5).double() / n
    p = torch.softmax(logits.double() / temperature, -1)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-4).all(), \
        f"T={temperature}: frequencies {freq.tolist()} vs softmax(logits / T) {p.tolist()}"


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]])
    assert sample_next(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}
    # probabilities ~ [.03,.64,.24,.09,.01]: top_p=0.7 keeps the two most likely
    picks = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}


def test_top_p_boundary_and_tiny_temperatures():
    """top_p keeps a token only while the tokens ranked above it cover less than top_p (so mass
    exactly top_p above it drops it, as Hugging Face's filter does); a tiny temperature is
    greedy in the limit, not a nan from inf - inf."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    p = torch.softmax((logits - logits.max()).double(), dim=-1)[0]  # the masses as sample_next sums them
    g = torch.Generator().manual_seed(0)
    kept = {sample_next(logits, 1.0, top_p=(p[0] + p[1]).item(), generator=g).item() for _ in range(300)}
    assert kept == {0, 1}, kept
    kept = {sample_next(logits, 1.0, top_p=p[0].item(), generator=g).item() for _ in range(100)}
    assert kept == {0}, kept
    # 1e-37 is above fp32's smallest normal, so it is sampled: only the shift by the row's max keeps
    # 50 / 1e-37 (inf in fp32) out of the softmax
    for t in (1e-37, 1e-40, 1e-300, 5e-324):
        picks = sample_next(torch.tensor([[1.0, 3.0, 2.0], [-1e4, 0.0, 50.0]]), t, generator=g)
        assert picks.flatten().tolist() == [1, 2], t


def test_top_p_cut_is_exact_over_thousands_of_tokens(monkeypatch):
    """The mass above a token is summed in float64: in fp32 the cut moved by a token or two when
    the boundary fell within fp32's rounding of a sum of thousands of probabilities (a row in
    five at GPT-2's vocabulary, random logits). One token of logit L and N of logit 0, top_p
    1e-10 either side of the mass of the first m + 1 of them: exactly m + 2 or m + 1 are kept."""
    kept, real = [], gen.draw_with_uniform
    # the distribution sample_next draws from: what it hands to the draw
    monkeypatch.setattr(gen, "draw_with_uniform", lambda logits, u: kept.append(int((logits > float("-inf")).sum()))
                        or real(logits, u))
    for N, L, m, side in ((1000, 2.0, 500, -1), (4000, 0.0, 3000, 1), (4000, 0.0, 3000, -1)):
        logits = torch.zeros(1, N + 1)
        logits[0, 0] = L
        Z = math.exp(L) + N
        top_p = (math.exp(L) + m) / Z + side * 1e-10
        kept.clear()
        sample_next(logits, 1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
        assert kept == [m + 2 if side > 0 else m + 1], (N, L, m, side, kept)
    # a top_p below fp32's smallest number was 0 there: every token dropped, and the draw failed on nan
    for top_p in (1e-46, 5e-324):
        assert sample_next(torch.tensor([[0.0, 2.0, 1.0]]), 1.0, top_p=top_p).item() == 1


def test_bad_arguments(model):
    with pytest.raises(UserError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(UserError, match="temperature"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1.0)
    with pytest.raises(UserError, match="top_p"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=1.0, top_p=1.5)
    idx = torch.zeros(1, 2, dtype=torch.long)
    model.train()
    bad = [(dict(temperature=float("nan")), "temperature must be a finite number"),
           (dict(temperature=float("inf")), "temperature"),
           (dict(temperature=1e39), "temperature must be at most fp32's largest"),  # (the kernel crashed on it)
           (dict(temperature=1.0, top_k=0), "top_k must be a positive integer"),
           (dict(temperature=1.0, top_k=2.5), "top_k must be a positive integer, got 2.5"),
           (dict(temperature=1.0, top_k=True), "top_k"),
           (dict(temperature=1.0, top_p=float("nan")), "top_p must be in"),
           # greedy ignores them, but a typo is still a typo: said before any work
           (dict(temperature=0.0, top_p=1.5), "top_p"), (dict(temperature=0.0, top_k=0), "top_k"),
           (dict(vocab_limit=2.5), "vocab_limit must be a positive integer, got 2.5"),
           # 0 would slice the logits to nothing (argmax of an empty row, a bare IndexError)
           (dict(vocab_limit=0), "vocab_limit must be a positive integer, got 0"),
           # an eos_id the model never draws stopped no row, and padded a row stop() ended with an id it refuses
           *[(dict(eos_id=e), rf"eos_id must be a token id \(an integer in \[0, 61\)\), got {e!r}")
             for e in (61, -1, 1.5, "x")],
           (dict(eos_id=9, vocab_limit=9), r"eos_id must be a token id \(an integer in \[0, 9\)\), got 9")]
    for kw, match in bad:
        with pytest.raises(UserError, match=match):
            generate(model, idx, 0, **kw)
        assert model.training, f"{kw}: generate left the model in eval mode"
    # a bool prompt ran as ids 0 and 1 in beam_search, a batch of none failed in the KV cache's check
    for prompt, said in ((idx > 0, "prompt must be a .batch, time. tensor of token ids, got a torch.bool tensor"),
                         (idx[:0], r"prompt must be a non-empty \[batch, time\] tensor, got shape \(0, 2\)")):
        for search in (lambda p: generate(model, p, 3), lambda p: beam_search(model, p, 3, 2)):
            with pytest.raises(UserError, match=said):
                search(prompt)
    for n in (2.5, None, "3", -1):  # range() and < raised bare TypeErrors on the first three
        with pytest.raises(UserError, match=r"max_new_tokens must be an integer >= 0, got"):
            generate(model, idx, n)
    assert generate(model, idx, np.int64(2)).shape == (1, 4)
    with pytest.raises(UserError, match="tensor of token ids, got list"):
        generate(model, [[1, 2]], 3)
    with pytest.raises(UserError, match="tensor of token ids, got a torch.float32 tensor"):
        generate(model, idx.float(), 3)
    model.eval()
    assert sample_next(torch.tensor([[0.0, 1.0]]), 1.0, top_k=np.int64(1)).item() == 1  # numpy ints are ints


def test_kv_cache_under_bf16_autocast_on_both_attention_paths(model):
    """The GPU default (bf16 autocast) projects keys in bf16: the cache must hold bf16, and the
    Triton attention must run with it (it refused the fp32 cache's keys as a dtype mismatch)."""
    idx = torch.randint(0, 61, (2, 5))
    outs = {}
    try:
        for kernels in ("reference", "attention"):
            model.set_kernels(kernels)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert model.new_cache(2).k.dtype == torch.bfloat16
                outs[kernels] = generate(model, idx, 6)
                # a cache made before autocast (fp32) still works: keys are cast as autocast would
                logits = {}
                for name, cache in (("fp32", None), ("bf16", model.new_cache(2))):
                    cache = cache if cache is not None else model.new_cache(2, dtype=torch.float32)
                    with torch.no_grad():
                        logits[name] = model(idx, cache).float()
                torch.testing.assert_close(logits["fp32"], logits["bf16"], atol=3e-2, rtol=0)
    finally:
        model.set_kernels("reference")
    assert torch.equal(outs["reference"], outs["attention"])


def test_top_k_keeps_every_token_tied_with_the_kth_and_a_k_past_the_vocabulary_keeps_all():
    """top_k drops the tokens scored below the k-th best, as Hugging Face's filter does: tokens
    tied with the k-th all stay (a top-k by index would keep one of the ties and drop the others
    for no reason of their scores); a k above the vocabulary keeps every token (torch.topk alone
    would raise 'selected index k out of range')."""
    logits = torch.tensor([[2.0, 0.0, 2.0, 2.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=1, generator=g).item() for _ in range(300)}
    assert picks == {0, 2, 3}, picks
    picks = {sample_next(logits, 1.0, top_k=50, generator=g).item() for _ in range(300)}
    assert picks == {0, 1, 2, 3, 4}, picks


def test_top_k_and_top_p_together_filter_in_hugging_face_order():
    """Both filters at once: top-k first, then top-p over what top-k left, renormalised (the
    order of Hugging Face's TopK then TopP warpers). p = [.4, .3, .2, .1], top_k 2, top_p .5: the
    two kept have masses .4/.7 = .57 and .3/.7 = .43, so top-p keeps only the first. top_p on
    the whole distribution (top_k ignored, or applied after top_p) keeps two."""
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, top_p=0.5, generator=g).item() for _ in range(200)}
    assert picks == {0}, picks
    picks = {sample_next(logits, 1.0, top_k=3, top_p=0.95, generator=g).item() for _ in range(300)}
    assert picks == {0, 1, 2}, picks  # .4/.9 + .3/.9 = .78 < .95 above the third: all three kept


def test_top_p_zero_is_refused_and_one_means_no_filter(model):
    """top_p is in (0, 1]: 0 would drop every token (softmax of all -inf, nan, and a bare
    RuntimeError from multinomial), so it is a UserError naming it; 1 keeps every token and is
    accepted."""
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(UserError, match="top_p must be in"):
        generate(model, idx, 1, temperature=1.0, top_p=0.0)
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(torch.tensor([[0.0, 1.0, -1.0]]), 1.0, top_p=1.0, generator=g).item() for _ in range(300)}
    assert picks == {0, 1, 2}, picks
    assert generate(model, idx, 2, temperature=1.0, top_p=1.0).shape == (1, 4)
    # no filter at all: a token of probability e^-40 ~ 4e-18, below float64's rounding of the mass
    # above it (exactly 1.0 = top_p), keeps its probability (a cut at top_p = 1 gave it 0)
    handed, real = [], gen.draw_with_uniform
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "draw_with_uniform",
                   lambda logits, u: handed.append(torch.softmax(logits, -1)) or real(logits, u))
        sample_next(torch.tensor([[0.0, -40.0]]), 1.0, top_p=1.0)
    assert handed[0][0, 1].item() == pytest.approx(math.exp(-40.0), rel=1e-4, abs=0), handed


def test_generation_runs_in_eval_mode_and_leaves_the_mode_as_it_was():
    """A model with dropout, handed over in train mode (pretraining samples mid-run): generate
    computes what the eval-mode model computes (no dropout noise in the tokens) and hands the
    model back in train mode; a model in eval mode stays in eval mode."""
    torch.manual_seed(0)
    m = GPTModel(GPTConfig(vocab_size=61, context_length=12, n_embd=32, n_layer=2, n_head=2, dropout=0.5))
    idx = torch.randint(0, 61, (2, 3))
    want = generate(m.eval(), idx, 8)
    assert not m.training
    m.train()
    for use_cache in (True, False):
        assert torch.equal(generate(m, idx, 8, use_cache=use_cache), want), use_cache
        assert m.training, "generate left the model in eval mode"


def test_sampling_reads_fp32_probabilities_from_bf16_logits(monkeypatch):
    """Under bf16 autocast (generate --dtype bf16) the LM head hands bf16 logits to sample_next:
    they are scaled by the temperature and normalised in fp32, so the distribution drawn from is
    softmax(logits / T) to fp32's precision (in bf16, the shift, the division and softmax each
    round to 8 bits: probabilities off by ~1e-3)."""
    handed, real = [], gen.draw_with_uniform
    monkeypatch.setattr(gen, "draw_with_uniform",
                        lambda logits, u: handed.append(torch.softmax(logits, -1)) or real(logits, u))
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 300, generator=g) * 3).bfloat16()
    for temperature in (0.7, 1.3):
        handed.clear()
        sample_next(logits, temperature, generator=g)
        want = torch.softmax(logits.double() / temperature, dim=-1)
        assert handed[0].dtype == torch.float32
        torch.testing.assert_close(handed[0].double(), want, atol=1e-6, rtol=0)


def test_the_kv_cache_is_as_long_as_the_call_can_fill():
    """A 131072-position model (Llama 3's context) decodes with a cache of prompt + new tokens, not
    of the whole context (gigabytes at that size), and gives a 64-position model's tokens; past the
    context the cache is the context, as before."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=61, n_embd=32, n_layer=2, n_head=2, position_encoding="rope")
    long = GPTModel(GPTConfig(context_length=131072, **cfg)).eval()
    short = GPTModel(GPTConfig(context_length=64, **cfg)).eval()
    short.load_state_dict(long.state_dict())
    lengths = []
    for m in (long, short):
        made = m.new_cache
        m.new_cache = lambda B, max_len=None, dtype=None, made=made: lengths.append(max_len) or made(B, max_len, dtype)
    idx = torch.randint(0, 61, (2, 5))
    assert torch.equal(generate(long, idx, 7), generate(short, idx, 7))
    assert generate(short, idx, 70).shape == (2, 75)  # past the context: the window slides
    assert lengths == [12, 12, 64]


# -- min-p and the repetition penalty, in transformers' order ------------------------------------------------
@pytest.mark.parametrize("warp", [dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
                                  dict(temperature=1.3, min_p=0.2), dict(temperature=1.0, repetition_penalty=0.8),
                                  dict(temperature=0.0, repetition_penalty=1.7)],
                         ids=["all", "min_p", "encouraged", "greedy"])
def test_sampling_draws_from_transformers_distribution(warp):
    """The logits sample_next draws from give transformers' processed scores' distribution (its
    RepetitionPenaltyLogitsProcessor, then Temperature, TopK, TopP and MinP warpers): the same tokens kept and the
    same probabilities; greedy keeps the penalty alone."""
    transformers = pytest.importorskip("transformers")
    from tritongpt.train.generate import sampling_logits

    g = torch.Generator().manual_seed(3)
    V = 101
    logits = torch.randn(4, V, generator=g) * 3
    seen = torch.randint(0, V, (4, 9), generator=g)
    seen[:, 1] = seen[:, 0]  # an id seen twice is penalized once
    seen[:, 2] = logits.argmax(-1)  # the likeliest token seen: greedy may pick another
    ours = sampling_logits(logits.clone(), seen=seen, **warp)
    hf = logits.clone()
    steps = []
    if warp.get("repetition_penalty"):
        steps.append(transformers.RepetitionPenaltyLogitsProcessor(warp["repetition_penalty"]))
    if warp["temperature"]:
        steps.append(transformers.TemperatureLogitsWarper(warp["temperature"]))
        for key, cls in (("top_k", transformers.TopKLogitsWarper), ("top_p", transformers.TopPLogitsWarper),
                         ("min_p", transformers.MinPLogitsWarper)):
            if warp.get(key) is not None:
                steps.append(cls(warp[key]))
    for step in steps:
        hf = step(seen, hf)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(hf.float(), -1), rtol=1e-5, atol=1e-7)
    if warp["temperature"] == 0.0:
        picked = sample_next(logits, **warp, seen=seen)
        assert torch.equal(picked[:, 0], hf.argmax(-1)) and not torch.equal(picked[:, 0], logits.argmax(-1))


def test_generate_penalizes_every_id_of_the_row_so_far(model):
    """Greedy with a repetition penalty, step by step: each token is the argmax of the uncached logits with every
    id of the prompt and of the tokens drawn so far penalized once (by hand); ids past a vocab_limit are left out."""
    from tritongpt.train.generate import penalize_repeats

    torch.manual_seed(8)
    idx = torch.randint(0, 61, (2, 4))
    out = generate(model, idx, 7, temperature=0.0, repetition_penalty=2.5)
    assert not torch.equal(out, generate(model, idx, 7, temperature=0.0))  # the penalty changed something
    with torch.no_grad():
        for t in range(4, out.size(1)):
            logits = model(out[:, :t])[:, -1].float()
            for r in range(2):
                for i in set(out[r, :t].tolist()):
                    v = logits[r, i]
                    logits[r, i] = v / 2.5 if v > 0 else v * 2.5
            assert torch.equal(out[:, t], logits.argmax(-1)), t
    few = torch.randn(2, 5)
    torch.testing.assert_close(penalize_repeats(few, torch.tensor([[7, 1], [60, 9]]), 2.0),
                               torch.stack([torch.cat([few[0, :1], few[0, 1:2] / 2 if few[0, 1] > 0 else
                                                       few[0, 1:2] * 2, few[0, 2:]]), few[1]]))


def test_min_p_and_repetition_penalty_are_checked_by_name(model, capsys):
    from tritongpt import cli

    for bad, said in ((dict(min_p=1.5), "min_p must be in [0, 1], got 1.5"),
                      (dict(min_p=-0.1), "min_p must be in [0, 1]"),
                      (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0 (1 = none)"),
                      (dict(repetition_penalty=math.inf), "repetition_penalty must be a finite number > 0"),
                      (dict(min_p_first="no"), "min_p_first must be a bool, got str 'no'")):
        with pytest.raises(UserError, match=re.escape(said)):
            generate(model, torch.randint(0, 61, (1, 3)), 2, temperature=1.0, **bad)
    assert cli.main(["generate", "--model", "tiny", "--prompt", "the", "--min-p", "2", "--device", "cpu"]) == 2
    assert "--min-p must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "tiny", "--prompt", "the", "--max-new-tokens", "4", "--device", "cpu",
                     "--kernels", "reference", "--min-p", "0.1", "--repetition-penalty", "1.2"]) == 0


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_commands_pass_min_p_and_the_repetition_penalty_on(command, monkeypatch, capsys):
    import io

    from tritongpt import cli
    from tritongpt.train import generate as gen

    seen, real = [], gen.generate

    def spy(*args, **kw):
        seen.append((kw.get("min_p"), kw.get("repetition_penalty")))
        return real(*args, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/quit\n"))
    flags = ["--model", "tiny", "--device", "cpu", "--kernels", "reference", "--max-new-tokens", "3",
             "--min-p", "0.1", "--repetition-penalty", "1.3"]
    assert cli.main([command, *flags, *(["--prompt", "the"] if command == "generate" else [])]) == 0
    assert seen == [(0.1, 1.3)]


# -- --stop ---------------------------------------------------------------------------------------------------
def test_a_stop_callback_ends_rows_as_an_eos_does(model):
    """generate(stop=...): a row it marks done is padded with eos_id from the next step, the call ends when every
    row is done, and the cache changes nothing."""
    torch.manual_seed(12)
    idx = torch.randint(0, 60, (3, 4))

    def stop(rows):  # row r is done once it holds r + 2 new tokens
        return torch.tensor([rows.size(1) - 4 >= r + 2 for r in range(3)])

    outs = [generate(model, idx, 10, temperature=1.0, eos_id=60, generator=torch.Generator().manual_seed(1),
                     stop=stop, use_cache=c) for c in (True, False)]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (3, 4 + 4)  # row 2 done after 4 new tokens
    for r in range(3):
        assert (outs[0][r, 4 + r + 2:] == 60).all()
    # no eos at all: the stop alone ends the call
    assert generate(model, idx, 10, temperature=1.0, stop=stop).shape == (3, 8)


def test_the_generate_command_stops_at_a_stop_text_streamed_or_not(capsys, monkeypatch):
    """--stop: the printed text ends before the first stop string in the new text (not in the prompt), streamed
    or not, the same text either way; several stops: the earliest; backslash escapes read; bad ones named."""
    from tritongpt import cli
    from tritongpt.commands import cut_at_stop, stop_strings
    from tritongpt.train import generate as gen

    lengths, real = [], gen.generate

    def spy(*args, **kw):
        out = real(*args, **kw)
        lengths.append(out.size(1))
        return out

    monkeypatch.setattr(gen, "generate", spy)
    flags = ["generate", "--model", "tiny", "--prompt", "The cat", "--temperature", "0", "--max-new-tokens", "30",
             "--device", "cpu", "--kernels", "reference"]
    assert cli.main(flags) == 0
    whole = capsys.readouterr().out.rstrip("\n")
    new = whole[len("The cat"):]
    stop = new[9:12]
    want = "The cat" + new[:new.index(stop)]
    assert len(want) < len(whole)
    for extra in ([], ["--stream"]):
        assert cli.main([*flags, "--stop", stop, "--stop", new[-3:], *extra]) == 0
        out = capsys.readouterr()
        assert out.out == want + "\n" and f"the text stopped at --stop {stop!r}" in out.err, (extra, out)
    assert lengths[1] == lengths[2] < lengths[0], lengths  # the drawing ended at the stop, not at --max-new-tokens
    assert stop_strings(["\\n\\n", "a\\tb", "é"]) == ["\n\n", "a\tb", "é"]
    assert cut_at_stop("ab\n\ncd\n", ["cd", "\n"]) == ("ab", "\n") and cut_at_stop("abc", ["x"]) == ("abc", None)
    for bad, said in (("", "an empty text would stop every sample"), ("\\x4", "a broken backslash escape")):
        assert cli.main([*flags, "--stop", bad]) == 2
        assert said in capsys.readouterr().err


def test_the_generate_command_takes_the_stop_listed_first_of_those_one_token_completes(capsys, monkeypatch):
    """--stop "e" --stop "h" and a drawn " the" (one token completing both): vLLM's check_stop_strings takes the
    first in the request's order that the step's text holds, cutting " th" (stop "e"); the earliest start cut " t",
    streamed or not. The model is a stand-in generate() that draws " the cat", stopping as asked."""
    from tritongpt import cli, commands

    real, tokens = commands.load_generation_model, []

    def loaded(args):
        out = real(args)
        tokens.extend(out[1].encode(" the cat"))
        assert out[1].decode(tokens[:1]) == " the"  # (one token: both stop strings in one step's text)
        return out

    def drawn(model, idx, max_new_tokens, on_token=None, stop=None, **kw):
        for t in tokens:
            idx = torch.cat([idx, torch.tensor([[t]])], 1)
            if on_token is not None:
                on_token(idx[:, -1:])
            if stop is not None and stop(idx).all():
                break
        return idx

    monkeypatch.setattr(commands, "load_generation_model", loaded)
    monkeypatch.setattr(gen, "generate", drawn)
    flags = ["generate", "--model", "tiny", "--prompt", "The cat", "--temperature", "0", "--max-new-tokens", "4",
             "--device", "cpu", "--kernels", "reference", "--stop", "e", "--stop", "h"]
    for extra in ([], ["--stream"]):
        tokens.clear()
        assert cli.main(flags + extra) == 0
        out = capsys.readouterr()
        assert out.out == "The cat th\n" and "stopped at --stop 'e'" in out.err, (extra, out)


def test_a_stop_cut_keeps_the_continuations_leading_space(tmp_path):
    """A SentencePiece-style tokenizer decodes a text's first "▁word" without its space: the continuation is read
    off the whole row's decoding, where the space is."""
    pytest.importorskip("transformers")
    from test_hf_tokenizer import llama_folder
    from tritongpt.commands import continuation
    from tritongpt.train.tokenizer import get_tokenizer

    folder, _, _ = llama_folder(tmp_path / "sp", "sentencepiece", context=64)
    tok = get_tokenizer(folder)
    ids = tok.encode("the cat")
    new = tok.encode("sat on")  # "▁sat ▁on": SentencePiece's dummy prefix
    assert tok.decode(new) == "sat on" and tok.decode(ids + new) == "the cat sat on"  # the decoder's Strip
    assert continuation(tok, ids, new) == " sat on"


# -- frequency and presence penalties, no-repeat n-grams ------------------------------------------------------
def hand_counts(logits, seen, starts, frequency, presence):
    """logit[t] -= frequency * count(t) + presence * (count(t) > 0), count(t) over row r's ids from starts[r] on,
    ids past the logits left out: a loop, in float64."""
    out = logits.clone().double()
    for r in range(seen.size(0)):
        counts = {}
        for i in seen[r, starts[r]:].tolist():
            counts[i] = counts.get(i, 0) + 1
        for i, c in counts.items():
            if i < out.size(1):
                out[r, i] -= frequency * c + presence
    return out


@pytest.mark.parametrize("frequency, presence", [(0.7, 0.0), (0.0, -0.4), (1.3, 0.9), (-2.0, 2.0)])
def test_frequency_and_presence_penalties_count_only_each_rows_generated_ids(frequency, presence):
    """Against a hand count, in float64: each row counts its own ids from where its prompt ends (rows whose prompts
    end at different columns, one that generated nothing), the prompt's never; an id past the logits is left
    out; after the repetition penalty (vLLM's order), greedy too."""
    from tritongpt.train.generate import penalize_counts, penalize_repeats, sampling_logits

    g = torch.Generator().manual_seed(5)
    V = 13
    logits = torch.randn(3, V, generator=g, dtype=torch.float64) * 3
    seen = torch.randint(0, 6, (3, 10), generator=g)  # few ids: many repeats
    seen[0, 7], seen[1, 9] = V + 2, 1  # past the logits (a vocab_limit); a repeat
    starts = [2, 5, 10]
    want = hand_counts(logits, seen, starts, frequency, presence)
    got = penalize_counts(logits, seen, torch.tensor(starts), frequency, presence)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got[2], logits[2])  # nothing generated: nothing penalized
    # one start for every row (what generate() passes)
    torch.testing.assert_close(penalize_counts(logits, seen, 4, frequency, presence),
                               hand_counts(logits, seen, [4] * 3, frequency, presence), rtol=0, atol=1e-12)
    # through sampling_logits, greedy: the repetition penalty first (on the raw logits, prompt included)
    ours = sampling_logits(logits, 0.0, repetition_penalty=1.5, seen=seen, frequency_penalty=frequency,
                           presence_penalty=presence, generated_from=torch.tensor(starts))
    torch.testing.assert_close(ours, hand_counts(penalize_repeats(logits, seen, 1.5).double(), seen, starts,
                                                 frequency, presence).float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 9])
def test_no_repeat_ngram_is_transformers(n):
    """Against transformers' NoRepeatNGramLogitsProcessor on random ids (few of them: many repeated n-grams) and
    logits, sequences shorter than n too; through sampling_logits, greedy and sampled."""
    transformers = pytest.importorskip("transformers")
    from tritongpt.train.generate import ban_repeated_ngrams, sampling_logits

    g = torch.Generator().manual_seed(n)
    V = 11
    for T in (1, 2, 5, 8, 20):
        seen = torch.randint(0, 4, (4, T), generator=g)
        logits = torch.randn(4, V, generator=g)
        want = transformers.NoRepeatNGramLogitsProcessor(n)(seen, logits.clone())
        assert torch.equal(ban_repeated_ngrams(logits, seen, n), want), T
        assert torch.equal(sampling_logits(logits, 0.0, seen=seen, no_repeat_ngram_size=n), want)
        tempered = sampling_logits(logits, 0.9, seen=seen, no_repeat_ngram_size=n)
        assert torch.equal(torch.isinf(tempered), torch.isinf(want))
        if n <= 2 and T >= 5:
            assert torch.isinf(want).any()  # the case is not empty
    # an id past the logits (a vocab_limit) is left out
    assert not torch.isinf(ban_repeated_ngrams(torch.zeros(1, 3), torch.tensor([[5, 5]]), 1)).any()
    # every id of a row banned: said, not multinomial's NaN error or greedy's id 0
    assert torch.isinf(ban_repeated_ngrams(torch.zeros(2, 3), torch.tensor([[0, 1, 1], [0, 0, 0]]), 1)).sum() == 3
    with pytest.raises(UserError, match=r"--no-repeat-ngram-size 1 bans every token of a row's vocabulary \(3\)"):
        ban_repeated_ngrams(torch.zeros(2, 3), torch.tensor([[0, 1, 1], [2, 1, 0]]), 1)


class RowPrefers(torch.nn.Module):
    """A model stand-in over 4 ids (0: the EOS) whose row 0 prefers the EOS and row 1 ids 2, then 3, then 0."""
    config = type("Config", (), dict(context_length=64, rope_scaling=None))()

    def forward(self, idx, cache=None):
        scores = torch.zeros(idx.size(0), idx.size(1), 4)
        scores[0, :, 0] = 5.0
        scores[1, :, 2], scores[1, :, 3], scores[1, :, 0] = 5.0, 4.0, 3.0
        return scores


def test_a_finished_row_whose_every_token_is_banned_does_not_stop_the_others():
    """no_repeat_ngram_size 1: row 0 has seen all 4 ids once it ends (its EOS too), while row 1 still draws; the
    finished row is padded with the EOS, not an error (it was, whatever the live rows had left)."""
    from tritongpt.train.generate import ban_repeated_ngrams

    out = generate(RowPrefers(), torch.tensor([[1, 2, 3], [1, 1, 1]]), 5, eos_id=0, no_repeat_ngram_size=1,
                   use_cache=False)
    assert out.tolist() == [[1, 2, 3, 0, 0, 0], [1, 1, 1, 2, 3, 0]]
    # the unit: a finished row keeps its logits; a live one with nothing left is still an error
    seen, logits = torch.tensor([[0, 1, 2], [0, 0, 1]]), torch.randn(2, 3)
    got = ban_repeated_ngrams(logits, seen, 1, live=torch.tensor([False, True]))
    assert torch.equal(got[0], logits[0]) and torch.isinf(got[1]).tolist() == [True, True, False]
    with pytest.raises(UserError, match="bans every token"):
        ban_repeated_ngrams(logits, seen, 1, live=torch.tensor([True, True]))


class Prefers(torch.nn.Module):
    """A model stand-in whose next-token logits are always `scores` (token 3 first, then 4, then 5)."""
    config = type("Config", (), dict(context_length=64, rope_scaling=None))()

    def forward(self, idx, cache=None):
        scores = torch.zeros(idx.size(0), idx.size(1), 9)
        scores[..., 3], scores[..., 4], scores[..., 5] = 5.0, 4.0, 3.0
        return scores


@pytest.mark.parametrize("warp, prompt, want", [
    (dict(), [1, 2], [3, 3, 3, 3, 3]),
    # 5 - 2 * count(3), 4 - 2 * count(4), 3 - 2 * count(5) (ties: the lower id); the prompt's 3s do not count
    (dict(frequency_penalty=2.0), [3, 3, 3, 3], [3, 4, 3, 5, 4]),
    (dict(presence_penalty=1.5), [3, 3, 3, 3], [3, 4, 3, 3, 3]),
    (dict(frequency_penalty=0.6, presence_penalty=0.5), [1], [3, 4, 3, 3, 5]),
    (dict(no_repeat_ngram_size=2), [1, 2], [3, 3, 4, 3, 5]),
    (dict(no_repeat_ngram_size=2), [3, 3], [4, 3, 5, 3, 0]),  # the prompt's (3, 3) is banned at once
    (dict(no_repeat_ngram_size=1), [3], [4, 5, 0, 1, 2]),
])
def test_greedy_generate_honours_the_penalties(warp, prompt, want):
    """A stand-in that always prefers token 3: greedy repeats it forever without a penalty, and each penalty turns
    it away exactly as counted by hand (cached and uncached paths alike)."""
    idx = torch.tensor([prompt])
    out = generate(Prefers(), idx, 5, temperature=0.0, use_cache=False, **warp)
    assert out[0, len(prompt):].tolist() == want


def test_generate_counts_each_rows_own_generated_ids_with_prompts_of_different_lengths(model):
    """Two prompts of different lengths in one batch, the shorter left-padded (generate() takes one width): greedy
    with frequency and presence penalties, step by step, is the argmax of the uncached logits less each row's own
    counts of what it generated (by hand), not the other row's nor its prompt's (padding included)."""
    torch.manual_seed(4)
    pad = 0
    prompts = [[7, 7, 9], [12, 5, 12, 30, 7]]
    idx = torch.tensor([[pad] * 2 + prompts[0], prompts[1]])
    warp = dict(frequency_penalty=1.7, presence_penalty=0.8)
    out = generate(model, idx, 6, temperature=0.0, **warp)
    assert not torch.equal(out, generate(model, idx, 6, temperature=0.0))  # the penalties changed something
    assert torch.equal(out, generate(model, idx, 6, temperature=0.0, use_cache=False, **warp))
    with torch.no_grad():
        for t in range(5, out.size(1)):
            logits = model(out[:, :t])[:, -1].double()
            assert torch.equal(out[:, t], hand_counts(logits, out[:, :t], [5, 5], 1.7, 0.8).argmax(-1)), t


def test_the_penalties_and_the_ngram_size_are_checked_by_name(model, capsys):
    from tritongpt import cli

    for bad, said in ((dict(frequency_penalty=2.5),
                       "frequency_penalty must be a number in [-2, 2] (0 = none), got 2.5"),
                      (dict(frequency_penalty=-2.01), "frequency_penalty must be a number in [-2, 2]"),
                      (dict(frequency_penalty=math.nan), "frequency_penalty must be a number in [-2, 2]"),
                      (dict(presence_penalty=math.inf), "presence_penalty must be a number in [-2, 2]"),
                      (dict(presence_penalty=-3), "presence_penalty must be a number in [-2, 2]"),
                      (dict(presence_penalty=True), "presence_penalty must be a number in [-2, 2]"),
                      (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0 (0 = off), got -1"),
                      (dict(no_repeat_ngram_size=2.0), "no_repeat_ngram_size must be an integer >= 0"),
                      (dict(no_repeat_ngram_size=True), "no_repeat_ngram_size must be an integer >= 0")):
        for temperature in (0.0, 1.0):  # greedy decoding checks them too
            with pytest.raises(UserError, match=re.escape(said)):
                generate(model, torch.randint(0, 61, (1, 3)), 2, temperature=temperature, **bad)
    # the ends of the range, and 0 / None: taken
    generate(model, torch.randint(0, 61, (1, 3)), 2, frequency_penalty=-2, presence_penalty=2.0,
             no_repeat_ngram_size=0)
    base = ["generate", "--model", "tiny", "--prompt", "the", "--device", "cpu"]
    for flag, value, said in (("--frequency-penalty", "3", "--frequency-penalty must be a number in [-2, 2]"),
                              ("--presence-penalty", "nan", "--presence-penalty must be a number in [-2, 2]"),
                              ("--no-repeat-ngram-size", "-1", "--no-repeat-ngram-size must be an integer >= 0")):
        assert cli.main([*base, flag, value]) == 2
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not an integer
        cli.main([*base, "--no-repeat-ngram-size", "1.5"])
    assert "--no-repeat-ngram-size: invalid int value: '1.5'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_commands_pass_the_penalties_and_the_ngram_size_on(command, monkeypatch, capsys):
    import io

    from tritongpt import cli
    from tritongpt.train import generate as gen

    seen, real = [], gen.generate

    def spy(*args, **kw):
        seen.append((kw.get("frequency_penalty"), kw.get("presence_penalty"), kw.get("no_repeat_ngram_size")))
        return real(*args, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/quit\n"))
    flags = ["--model", "tiny", "--device", "cpu", "--kernels", "reference", "--max-new-tokens", "3",
             "--frequency-penalty", "0.5", "--presence-penalty", "-0.25", "--no-repeat-ngram-size", "2"]
    assert cli.main([command, *flags, *(["--prompt", "the"] if command == "generate" else [])]) == 0
    assert seen == [(0.5, -0.25, 2)]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/quit\n"))
    assert cli.main([command, *flags[:8], *(["--prompt", "the"] if command == "generate" else [])]) == 0
    assert seen == [(0.5, -0.25, 2), (None, None, None)]  # off by default


# -- typical-p, epsilon and eta cutoffs, top-n-sigma ------------------------------------------------------------
NEW_WARPERS = (("typical_p", "TypicalLogitsWarper"), ("epsilon_cutoff", "EpsilonLogitsWarper"),
               ("eta_cutoff", "EtaLogitsWarper"))


@pytest.mark.parametrize("key, cls, value", [(k, c, v) for k, c in NEW_WARPERS
                                             for v in {"typical_p": (0.2, 0.9), "epsilon_cutoff": (0.003, 0.02),
                                                       "eta_cutoff": (0.001, 0.05)}[k]])
def test_each_new_warper_is_transformers(key, cls, value):
    """Each alone on fresh random logits (some rows sharp, some flat, some with tokens already cut) keeps exactly
    the tokens transformers' warper keeps, with its probabilities."""
    transformers = pytest.importorskip("transformers")
    from tritongpt.train.generate import sampling_logits

    g = torch.Generator().manual_seed(int(value * 1e4) + len(key))  # fresh logits for each case
    logits = torch.randn(8, 211, generator=g) * torch.linspace(0.5, 6, 8).unsqueeze(1)
    logits[6:, ::3] = -math.inf  # an earlier cut (an n-gram ban)
    ours = sampling_logits(logits.clone(), temperature=1.0, **{key: value})
    hf = getattr(transformers, cls)(value)(None, logits.clone())
    assert torch.isinf(hf).sum() > torch.isinf(logits).sum()  # it cuts something here
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    torch.testing.assert_close(torch.softmax(ours, -1), torch.softmax(hf, -1), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def hf_gpt2():
    """A random GPT-2 in transformers (sharpened: its distributions far from uniform) and the same weights here."""
    transformers = pytest.importorskip("transformers")
    import tempfile

    from tritongpt.train.gpt2_weights import load_gpt2_safetensors

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new", bos_token_id=0,
                                  eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        return hf, load_gpt2_safetensors(f"{folder}/model.safetensors").eval()


@pytest.mark.parametrize("warp", [
    dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.02, typical_p=0.8, epsilon_cutoff=0.004, eta_cutoff=0.006,
         repetition_penalty=1.3),
    dict(temperature=1.3, top_p=0.9, typical_p=0.6),
    dict(temperature=0.8, top_k=30, epsilon_cutoff=0.01),
    dict(temperature=1.6, min_p=0.01, eta_cutoff=0.03)], ids=["all", "typical", "epsilon", "eta"])
def test_transformers_generate_draws_from_the_same_warped_distributions(hf_gpt2, warp):
    """transformers' generate(do_sample=True) on a tiny GPT-2 (its own _get_logits_processor chain, in its order),
    its processed scores at every step against sampling_logits on our model's logits for the text it drew: the same
    tokens kept, the same probabilities."""
    transformers = pytest.importorskip("transformers")
    from tritongpt.train.generate import sampling_logits

    hf, ours = hf_gpt2
    torch.manual_seed(4)
    idx = torch.randint(1, 97, (3, 6))
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=True, max_new_tokens=6, pad_token_id=0,
                      eos_token_id=None, return_dict_in_generate=True, output_scores=True, output_logits=True,
                      **{"top_k": 0, **warp})  # (its own default top_k is 50)
    names = [type(p).__name__ for p in hf._get_logits_processor(
        generation_config=transformers.GenerationConfig(do_sample=True, **warp), input_ids_seq_length=6,
        logits_processor=transformers.LogitsProcessorList(), device="cpu")]
    assert all(cls in names for key, cls in NEW_WARPERS if key in warp)
    with_new = without = 0
    with torch.no_grad():
        for j, scores in enumerate(out.scores):
            text = out.sequences[:, :6 + j]
            logits = ours(text)[:, -1]
            torch.testing.assert_close(logits, out.logits[j], rtol=1e-4, atol=1e-4)  # the same model
            got = sampling_logits(logits, seen=text, **warp)
            assert torch.equal(torch.isinf(got), torch.isinf(scores))
            torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(scores, -1), rtol=1e-5, atol=1e-6)
            old = {k: v for k, v in warp.items() if k not in dict(NEW_WARPERS)}
            with_new, without = with_new + int(torch.isinf(got).sum()), \
                without + int(torch.isinf(sampling_logits(logits, seen=text, **old)).sum())
    assert with_new > without  # the new warpers cut tokens the others kept


def hand_top_n_sigma(row, n):
    """The kept ids of one row (a list of floats), by the paper's rule with Python floats: logit >= max - n * std,
    the population std of the finite logits."""
    import statistics

    finite = [x for x in row if x != -math.inf]
    cut = max(finite) - n * statistics.pstdev(finite)
    return [i for i, x in enumerate(row) if x >= cut]


@pytest.mark.parametrize("n", [0.5, 1.0, 2.5])
def test_top_n_sigma_keeps_what_the_papers_rule_keeps_at_any_temperature(n):
    from tritongpt.train.generate import sampling_logits

    g = torch.Generator().manual_seed(int(n * 10))
    logits = torch.randn(5, 157, generator=g).double() * torch.linspace(0.5, 4, 5, dtype=torch.double).unsqueeze(1)
    logits[3, ::4] = -math.inf  # an n-gram ban's -inf: left out of the std
    for temperature in (0.5, 1.0, 1.7):  # the scaled logits' max and std scale alike: the same ids kept
        got = sampling_logits(logits.clone(), temperature=temperature, top_n_sigma=n)
        kept = [torch.isfinite(r).nonzero().flatten().tolist() for r in got]
        assert kept == [hand_top_n_sigma(r, n) for r in logits.tolist()]
        assert sum(map(len, kept)) > 2 * len(kept) and max(map(len, kept)) < 100  # it cuts, and keeps several
        want = torch.softmax(logits.masked_fill(~torch.isfinite(got), -math.inf) / temperature, -1)
        torch.testing.assert_close(torch.softmax(got.double(), -1), want, rtol=1e-5, atol=1e-7)
    # after temperature, before top-k: top-k counts among what top-n-sigma kept
    both = sampling_logits(logits.clone(), temperature=1.0, top_n_sigma=n, top_k=3)
    assert torch.equal(torch.isfinite(both), torch.isfinite(sampling_logits(
        sampling_logits(logits.clone(), temperature=1.0, top_n_sigma=n), temperature=1.0, top_k=3)))


def test_greedy_ignores_the_new_warpers():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 89, generator=g) * 3
    got = sample_next(logits, temperature=0.0, typical_p=0.01, epsilon_cutoff=0.5, eta_cutoff=0.5, top_n_sigma=0.01)
    assert torch.equal(got[:, 0], logits.argmax(-1))


def hand_typical_choice(logits, temperature):
    """The one token typical_p 1e-9 keeps: the surprisal nearest the entropy, float64 Python."""
    z = [x / temperature for x in logits]
    m = max(z)
    total = sum(math.exp(x - m) for x in z)
    logp = [x - m - math.log(total) for x in z]
    entropy = -sum(math.exp(lp) * lp for lp in logp)
    return min(range(len(z)), key=lambda i: abs(-logp[i] - entropy))


@pytest.mark.parametrize("how", ["cache", "no cache", "draft"])
def test_generate_applies_them_within_vocab_limit(model, how):
    """Cuts that leave one token make sampled generate() deterministic, whatever the seed: epsilon 0.99 and
    top-n-sigma 1e-6 the likeliest token (greedy's), typical_p 1e-9 the surprisal nearest the entropy, among the
    first vocab_limit ids (computed by hand here step by step); with a draft model too (both warped alike: the
    model's one token is the only one its verdict lets through)."""
    idx = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(3)
    kw = dict(use_cache=how != "no cache", vocab_limit=50,
              draft=GPTModel(GPTConfig(vocab_size=61, context_length=12, n_embd=16, n_layer=1, n_head=2)).eval()
              if how == "draft" else None)
    greedy = generate(model, idx, 6, **kw)
    for cut in (dict(epsilon_cutoff=0.99), dict(top_n_sigma=1e-6)):
        out = generate(model, idx, 6, temperature=1.3, generator=torch.Generator().manual_seed(1), **kw, **cut)
        assert torch.equal(out, greedy)
    out = generate(model, idx, 6, temperature=0.9, typical_p=1e-9, generator=torch.Generator().manual_seed(2), **kw)
    text = idx
    with torch.no_grad():
        for _ in range(6):
            rows = model(text)[:, -1, :50].double().tolist()
            text = torch.cat([text, torch.tensor([[hand_typical_choice(r, 0.9)] for r in rows])], dim=1)
    assert torch.equal(out, text) and not torch.equal(out, greedy)


def test_the_new_warpers_are_checked_by_name(model, capsys):
    from tritongpt import cli

    for bad, said in ((dict(typical_p=0.0), "typical_p must be in (0, 1] (1 = off), got 0.0"),
                      (dict(typical_p=1.5), "typical_p must be in (0, 1]"),
                      (dict(typical_p=math.nan), "typical_p must be in (0, 1]"),
                      (dict(epsilon_cutoff=1.0), "epsilon_cutoff must be in [0, 1) (0 = off), got 1.0"),
                      (dict(epsilon_cutoff=-0.1), "epsilon_cutoff must be in [0, 1)"),
                      (dict(eta_cutoff=2), "eta_cutoff must be in [0, 1) (0 = off), got 2"),
                      (dict(eta_cutoff=math.nan), "eta_cutoff must be in [0, 1)"),
                      (dict(top_n_sigma=0.0), "top_n_sigma must be a finite number > 0, got 0.0"),
                      (dict(top_n_sigma=math.inf), "top_n_sigma must be a finite number > 0"),
                      (dict(top_n_sigma="1"), "top_n_sigma must be a finite number > 0")):
        for temperature in (0.0, 1.0):  # greedy decoding checks them too
            with pytest.raises(UserError, match=re.escape(said)):
                generate(model, torch.randint(0, 61, (1, 3)), 2, temperature=temperature, **bad)
    # the ends of the ranges that are in them, and the offs: taken
    generate(model, torch.randint(0, 61, (1, 3)), 2, temperature=1.0, typical_p=1.0, epsilon_cutoff=0.0,
             eta_cutoff=0.0)
    base = ["generate", "--model", "tiny", "--prompt", "the", "--device", "cpu"]
    for flag, value, said in (("--typical-p", "0", "--typical-p must be in (0, 1]"),
                              ("--epsilon-cutoff", "1", "--epsilon-cutoff must be in [0, 1)"),
                              ("--eta-cutoff", "-1", "--eta-cutoff must be in [0, 1)"),
                              ("--top-n-sigma", "-2", "--top-n-sigma must be a finite number > 0")):
        assert cli.main([*base, flag, value]) == 2
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_commands_pass_the_new_warpers_on(command, monkeypatch, capsys):
    import io

    from tritongpt import cli
    from tritongpt.train import generate as gen

    seen, real = [], gen.generate
    keys = ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_n_sigma")

    def spy(*args, **kw):
        seen.append(tuple(kw.get(k) for k in keys))
        return real(*args, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/quit\n"))
    flags = ["--model", "tiny", "--device", "cpu", "--kernels", "reference", "--max-new-tokens", "3",
             "--typical-p", "0.9", "--epsilon-cutoff", "3e-4", "--eta-cutoff", "0.002", "--top-n-sigma", "1.5"]
    assert cli.main([command, *flags, *(["--prompt", "the"] if command == "generate" else [])]) == 0
    assert seen == [(0.9, 3e-4, 0.002, 1.5)]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/quit\n"))
    assert cli.main([command, *flags[:8], *(["--prompt", "the"] if command == "generate" else [])]) == 0
    assert seen == [(0.9, 3e-4, 0.002, 1.5), (None, None, None, None)]  # off by default


def test_logit_bias_is_added_before_the_cuts_and_names_an_id_outside_the_logits():
    """logit_bias {id: b} adds b to those logits (greedy follows it); an id past the logits drawn from is named
    (checked on the host: a GPU's max of the ids would wait for the device every step)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    low = logits.argmin(-1)
    biased = sample_next(logits, 0.0, logit_bias={int(low[0]): 100.0})
    assert int(biased[0, 0]) == int(low[0])
    assert torch.equal(sample_next(logits, 0.0, logit_bias={int(logits[1].argmax()): -100.0})[1, 0] !=
                       logits[1].argmax(), torch.tensor(True))
    with pytest.raises(UserError, match="logit_bias has token id 11, outside the 11 tokens drawn from"):
        sample_next(logits, 0.0, logit_bias={2: 1.0, 11: 1.0})


def test_step_logprobs_stay_on_the_logits_device():
    """step_logprobs runs in the engine's per-step path: its tensors stay where the logits are (a copy to the CPU
    there would wait for the GPU every step; the consumer's tolist() takes them). The meta device stands in for a
    GPU: it has no data to copy, so a .cpu() fails. Values: float64 log-softmax's."""
    lp, ids, vals = step_logprobs(torch.empty(3, 11, device="meta"), torch.zeros(3, 1, dtype=torch.long,
                                                                                 device="meta"), 4)
    assert {t.device.type for t in (lp, ids, vals)} == {"meta"}
    assert lp.shape == (3,) and ids.shape == vals.shape == (3, 4)
    torch.manual_seed(0)
    logits, nxt = torch.randn(3, 11), torch.tensor([[2], [10], [5]])
    lp, ids, vals = step_logprobs(logits, nxt, 4)
    ref = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(lp.double(), ref.gather(-1, nxt)[:, 0], rtol=1e-6, atol=1e-6)
    assert torch.equal(ids, ref.topk(4).indices) and torch.allclose(vals.double(), ref.topk(4).values, atol=1e-6)


@pytest.mark.cuda
def test_logit_bias_and_step_logprobs_queue_on_the_gpu_without_waiting_for_it():
    """The decode step's logit_bias, logprobs and min_tokens' mask run every step: on CUDA none waits for the GPU
    (the sync debug mode raises at a synchronizing call; a blocking host-to-device copy is one)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 1001, device="cuda")
    nxt = torch.tensor([[5], [1000], [7]], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        biased = sampling_logits(logits, 0.0, logit_bias={5: 3.0, 1000: -100.0})
        step = step_logprobs(logits, nxt, 4)
        held = held_back(logits, (1000, 5))  # min_tokens' mask
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert held[:, [5, 1000]].eq(float("-inf")).all() and torch.equal(held[:, 6:1000], logits[:, 6:1000])
    want = logits.float().clone()
    want[:, 5] += 3.0
    want[:, 1000] -= 100.0
    assert torch.equal(biased, want) and step[1].shape == (3, 4)


def test_min_tokens_draws_from_the_masked_distribution_and_stop_token_ids_end_rows(model):
    """vLLM's min_tokens masks the EOS and the stop tokens in the sampling itself (their logits -inf until a row has
    min_tokens new tokens): the draws are the masked distribution's with the same generator, never an EOS redrawn.
    Then a stop token ends a row as the EOS does (padded with the EOS), and ignore_eos runs past a drawn EOS."""
    from tritongpt.train.generate import last_logits

    idx = torch.randint(0, 61, (4, 3), generator=torch.Generator().manual_seed(5))
    eos, stop, bias = 7, 11, {7: 6.0, 11: 6.0}  # the end tokens all but certain wherever they may be drawn
    out = generate(model, idx, 7, temperature=1.0, eos_id=eos, stop_token_ids=[stop], min_tokens=3, logit_bias=bias,
                   generator=torch.Generator().manual_seed(1), use_cache=False)
    g, want = torch.Generator().manual_seed(1), idx
    for j in range(4):  # the 3 masked draws, then the end token's
        logits = last_logits(model, want)[:, -1]
        if j < 3:
            logits = logits.index_fill(-1, torch.tensor([eos, stop]), float("-inf"))
        want = torch.cat([want, sample_next(logits, 1.0, generator=g, logit_bias=bias)], dim=1)
    assert torch.equal(out[:, :7], want)
    new = out[:, 3:].tolist()
    assert not {eos, stop} & {t for row in new for t in row[:3]}
    assert {row[3] for row in new} == {eos, stop}  # (seeded: both end tokens end rows)
    assert out.shape == (4, 7)  # every row ended at its 4th token: nothing more drawn
    # without min_tokens the first draw is an end token; ignore_eos: the EOS ends nothing, a stop token still does
    assert generate(model, idx, 4, eos_id=eos, logit_bias={eos: 50.0}).shape == (4, 4)
    run = generate(model, idx, 4, eos_id=eos, logit_bias={eos: 50.0}, ignore_eos=True)
    assert run[:, 3:].eq(eos).all() and run.shape == (4, 7)
    ended = generate(model, idx, 4, eos_id=eos, logit_bias={eos: 50.0, stop: 60.0}, ignore_eos=True,
                     stop_token_ids=[stop], min_tokens=2)
    # (min_tokens holds the EOS back even when ignored, as vLLM's: the first 2 are neither)
    assert ended.shape == (4, 6) and ended[:, 5].eq(stop).all()
    assert not {eos, stop} & set(ended[:, 3:5].flatten().tolist())
    with pytest.raises(UserError, match="stop_token_ids must be token ids"):
        generate(model, idx, 2, stop_token_ids=[61])
    with pytest.raises(UserError, match="min_tokens must be an integer >= 0"):
        generate(model, idx, 2, min_tokens=-1)
    with pytest.raises(UserError, match="min_tokens masks a one-token decode step"):
        generate(model, idx, 2, min_tokens=1, eos_id=eos, prompt_lookup=2)


def test_the_generate_commands_stop_check_decodes_each_new_token_once(monkeypatch, capsys):
    """`generate --stop` asked every step whether a row's text holds a stop string by decoding the prompt and every
    new id again (O(length) a token); it now asks Choices.stopped, which grows each row's text by its new ids. A
    counting spy on the tokenizer's decode_bytes over 30 new tokens that never hold the stop string."""
    from tritongpt import cli
    from tritongpt.train.tokenizer import BPETokenizer, get_tokenizer

    decoded, real = [], BPETokenizer.decode_bytes
    monkeypatch.setattr(BPETokenizer, "decode_bytes", lambda self, ids: decoded.append(len(ids)) or real(self, ids))
    prompt = "The cat sat on the mat and the dog ran in the park while " * 2
    assert cli.main(["generate", "--model", "tiny", "--prompt", prompt, "--temperature", "0", "--max-new-tokens",
                     "30", "--device", "cpu", "--kernels", "reference", "--stop", "\\x00\\x01"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    # the prompt and the row a few times (its text, whether it ends on a whole character, the printed text, the
    # text before the last token for cut_at_stop's since), each new token once: 353 ids (old: the prompt and the new
    # ids so far every step, 1812)
    assert sum(decoded) <= 6 * (len(get_tokenizer().encode(prompt)) + 30), sum(decoded)
