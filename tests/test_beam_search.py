"""Beam search (train/beam_search.py, `tritongpt generate --num-beams`): token for token and score for score
transformers' generate(num_beams=...) on a tiny GPT-2 both run; the cache's reorder; refusals; the command."""
import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.beam_search import beam_search
from tritongpt.train.generate import generate

V, T, NEW = 50, 5, 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory, one_thread):
    """A random GPT-2 in transformers and the same weights loaded here (sharpened weights: the texts end at an EOS
    it likes, at different lengths, so the early stopping and length penalty settings give different answers)."""
    transformers = pytest.importorskip("transformers")
    from tritongpt.train.gpt2_weights import load_gpt2_safetensors

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new", bos_token_id=0,
                                  eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path_factory.mktemp("beams")
    hf.save_pretrained(folder)
    return hf, load_gpt2_safetensors(folder / "model.safetensors").eval()


def prompts(seed):
    """Two fresh prompts [2, T]."""
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def theirs(hf, idx, eos, **kw):
    """eos: an id, or a list of them (the first pads, as transformers' default pad is eos_token_id[0])."""
    pad = eos[0] if isinstance(eos, list) else eos
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, eos_token_id=eos, pad_token_id=pad,
                      return_dict_in_generate=True, output_scores=True, **kw)
    return out.sequences, out.sequences_scores


def likes(model, idx, rank):
    """An EOS the model likes after the first prompt: its rank-th likeliest next token (0: the likeliest)."""
    return int(model(idx)[0, -1].argsort(descending=True)[rank])


@pytest.mark.parametrize("num_beams", [2, 3, 4])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_ids_and_scores_equal_transformers(pair, num_beams, early_stopping):
    hf, model = pair
    ended = shorter = 0
    for seed, rank in ((1, 0), (2, 1), (3, 2)):
        idx = prompts(seed)
        eos = likes(model, idx, rank)
        for lp in (1.0, 0.5, 2.0):
            kw = dict(max_new_tokens=NEW, num_beams=num_beams, length_penalty=lp, early_stopping=early_stopping,
                      num_return_sequences=num_beams)
            ids, scores = beam_search(model, idx, eos_id=eos, **kw)
            want_ids, want_scores = theirs(hf, idx, eos, **kw)
            assert torch.equal(ids, want_ids), (seed, rank, lp)
            assert torch.allclose(scores, want_scores, rtol=0, atol=1e-5), (seed, rank, lp)
            ended += int((ids[:, T:] == eos).any())
            shorter += ids.size(1) < T + NEW
    assert ended > 3 and (early_stopping is not True or shorter)  # EOS was drawn, and True stopped early


def test_the_settings_change_the_answer(pair):
    """The cases above are ones where early_stopping and length_penalty matter (else a wrong one could pass)."""
    _, model = pair
    idx = prompts(1)
    eos = likes(model, idx, 0)
    runs = {(es, lp): beam_search(model, idx, NEW, 3, lp, es, 3, eos) for es in (False, True, "never")
            for lp in (1.0, 0.5, 2.0)}
    for a, b in (((False, 1.0), (True, 1.0)), ((False, 1.0), ("never", 1.0)), ((False, 1.0), (False, 2.0)),
                 ((False, 1.0), (False, 0.5)), ((False, 2.0), ("never", 2.0))):
        x, y = runs[a][0], runs[b][0]
        assert x.shape != y.shape or not torch.equal(x, y), (a, b)


@pytest.mark.parametrize("extra", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
                                   dict(repetition_penalty=0.7, no_repeat_ngram_size=1)])
def test_the_penalties_are_transformers_logits_processors(pair, extra):
    """transformers applies them to the log-probabilities in beam search (not the logits): so do we."""
    hf, model = pair
    idx = prompts(3)
    eos = likes(model, idx, 2)
    kw = dict(max_new_tokens=NEW, num_beams=3, num_return_sequences=2, **extra)
    ids, scores = beam_search(model, idx, eos_id=eos, **kw)
    want_ids, want_scores = theirs(hf, idx, eos, **kw)
    assert torch.equal(ids, want_ids) and torch.allclose(scores, want_scores, rtol=0, atol=1e-5)
    assert not torch.equal(ids, beam_search(model, idx, NEW, 3, eos_id=eos, num_return_sequences=2)[0])


def test_without_eos_and_without_cache(pair):
    """No EOS: every beam runs to max_new_tokens; the cache-less path (the whole text each step) gives the same;
    each prompt of a batch is searched as alone; one beam is greedy decoding."""
    hf, model = pair
    idx = prompts(5)
    ids, scores = beam_search(model, idx, 8, 3, num_return_sequences=3)
    # transformers needs an EOS id to pad with: give it one never drawn here (checked below)
    want_ids, want_scores = theirs(hf, idx, V - 1, max_new_tokens=8, num_beams=3, num_return_sequences=3)
    assert (ids[:, T:] != V - 1).all() and torch.equal(ids, want_ids)
    assert torch.allclose(scores, want_scores, rtol=0, atol=1e-5)
    uncached = beam_search(model, idx, 8, 3, num_return_sequences=3, use_cache=False)
    assert torch.equal(uncached[0], ids) and torch.allclose(uncached[1], scores, rtol=0, atol=1e-5)
    alone = beam_search(model, idx[1:], 8, 3, num_return_sequences=3)
    assert torch.equal(alone[0], ids[3:]) and torch.allclose(alone[1], scores[3:], rtol=0, atol=1e-5)
    assert torch.equal(beam_search(model, idx, 8, 1)[0], generate(model, idx, 8))
    assert torch.equal(beam_search(model, idx, 0, 3)[0], idx)  # no new token: the prompt, once (more: refused)
    # the score is the summed log-probability of the new tokens / their number, recomputed from the logits in fp64
    logp = torch.log_softmax(model(ids[:1, :-1]).double(), dim=-1)[0, T - 1:]
    assert abs(logp.gather(1, ids[0, T:, None]).sum().item() / 8 - scores[0].item()) < 1e-5


def test_one_forward_a_step_over_every_beam(pair):
    """The prompt is run once (in every beam's row), then each step one token a row: B * N rows, one forward."""
    _, model = pair
    shapes = []
    hook = model.trf_blocks[0].register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape[:2]))
    try:
        ids, _ = beam_search(model, prompts(5), 6, 3)
    finally:
        hook.remove()
    assert ids.shape == (2, T + 6) and shapes == [(6, T)] + [(6, 1)] * 5


def test_the_lm_head_reads_the_last_position_only(pair):
    """The prefill's logits are the last position's alone (transformers' logits_to_keep=1): the whole prompt's
    would be B * N * T * V numbers, N times a plain generate's, where one position a row is needed."""
    _, model = pair
    shapes = []
    hook = model.out_head.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        ids, _ = beam_search(model, prompts(5), 4, 3)
        uncached, _ = beam_search(model, prompts(5), 4, 3, use_cache=False)
    finally:
        hook.remove()
    assert torch.equal(ids, uncached) and shapes == [(6, model.config.n_embd)] * 8


def test_reorder_moves_the_cache_rows():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=16, n_embd=32, n_layer=2, n_head=2)).eval()
    ids = torch.randint(0, V, (3, 7))
    order = torch.tensor([2, 2, 0])
    with torch.no_grad():
        cache = model.new_cache(3, 8)
        model(ids[:, :5], cache)
        cache.reorder(order)
        got = model(ids[order, 5:], cache)
        want = model(ids[order])[:, 5:]
    assert torch.allclose(got, want, atol=1e-5)
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 3]), torch.tensor([0.0, 1.0, 2.0])):
        with pytest.raises(UserError, match="KV cache"):
            cache.reorder(bad)


def test_reorder_copies_a_layer_at_a_time():
    """Each step reorders the cache: the copy it makes is one layer's keys (or values), as transformers' cache
    reorders layer by layer, not the whole cache's (n_layer times more memory for the step)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=V, context_length=16, n_embd=32, n_layer=4, n_head=2)).eval()
    ids = torch.randint(0, V, (3, 12))
    order = torch.tensor([2, 2, 0])
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        model(ids[:, :10], cache)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            cache.reorder(order)
        got = model(ids[order, 10:], cache)
        want = model(ids[order])[:, 10:]
    assert torch.allclose(got, want, atol=1e-5)
    layer = cache.k[0, :, :, :10].numel() * cache.k.element_size()
    assert 0 < max(e.cpu_memory_usage for e in prof.events()) <= layer


def test_triton_path_gives_the_same_beams(device, one_thread):
    cfg = dict(vocab_size=V, context_length=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    ref = GPTModel(GPTConfig(**cfg)).to(device).eval()
    tri = GPTModel(GPTConfig(**cfg, kernels="triton")).to(device).eval()
    tri.load_state_dict(ref.state_dict())
    idx = prompts(1).to(device)
    eos = likes(ref, idx, 1)
    want = beam_search(ref, idx, 6, 3, eos_id=eos, num_return_sequences=2)
    got = beam_search(tri, idx, 6, 3, eos_id=eos, num_return_sequences=2)
    assert torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-4)


@pytest.mark.parametrize("kw,said", [
    (dict(num_beams=0), "num_beams must be a positive integer"),
    (dict(num_return_sequences=4), r"num_return_sequences must be an integer in \[1, num_beams 3\]"),
    (dict(early_stopping=1), "early_stopping must be True, False or 'never'"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(length_penalty=1e308), "length_penalty 1e\\+308 is out of range for max_new_tokens 4"),
    (dict(length_penalty=-1e308), "length_penalty -1e\\+308 is out of range"),
    (dict(max_new_tokens=13), r"prompt 5 \+ max_new_tokens 13 - 1 > context length 16"),
    # no new token: one text, the prompt (it was returned R times, each scored 0, as R beams)
    (dict(max_new_tokens=0, num_return_sequences=2), "num_return_sequences 2 with max_new_tokens 0: no token is "
                                                     "generated, so there is one text, the prompt, not 2 beams"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
    (dict(allowed_token_ids=[1, 2]), "beam_search does not take allowed_token_ids"),
    (dict(bad_words=[[1]]), "beam_search does not take bad_words"),
    *[(dict(eos_id=e), rf"eos_id must be a token id \(an integer in \[0, {V}\)\), got {e!r}") for e in (V, -1, "x")],
    (dict(eos_id=7, vocab_limit=7), r"eos_id must be a token id \(an integer in \[0, 7\)\), got 7"),
])
def test_refusals(kw, said):
    model = GPTModel(GPTConfig(vocab_size=V, context_length=16, n_embd=32, n_layer=1, n_head=2))
    args = {"max_new_tokens": 4, "num_beams": 3, **kw}
    with pytest.raises(UserError, match=said):
        beam_search(model, prompts(0), **args)


# -- the command ---------------------------------------------------------------------------------------------

def test_the_generate_command_prints_the_beams(saved, capsys, one_thread):
    from tritongpt import cli
    from tritongpt.commands import SAMPLE_SEPARATOR
    from tritongpt.train.gpt2_weights import load_checkpoint
    from tritongpt.train.sft import pick_tokenizer
    from tritongpt.train.tokenizer import eot_or_none

    base = ["generate", "--weights", str(saved), "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "6"]
    assert cli.main([*base, "--num-beams", "3", "--num-return-sequences", "2", "--length-penalty", "0.5",
                     "--early-stopping", "never"]) == 0
    out = capsys.readouterr()
    model = load_checkpoint(str(saved)).eval()
    tok = pick_tokenizer(None, str(saved), model.config.vocab_size)
    ids = tok.encode("The cat")
    want, scores = beam_search(model, torch.tensor([ids]), 6, 3, 0.5, "never", 2, eot_or_none(tok))
    texts = [tok.decode(row) for row in want.tolist()]
    assert texts[0] != texts[1] and out.out == f"{texts[0]}\n{SAMPLE_SEPARATOR}\n{texts[1]}\n"
    assert f"beam 1: score {scores[0].item():.6f}" in out.err and f"beam 2: score {scores[1].item():.6f}" in out.err
    # --num-beams 1 is off: generate's own greedy (its temperature then defaults to sampling's 0.8)
    assert cli.main([*base, "--num-beams", "1", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tok.decode(generate(model, torch.tensor([ids]), 6)[0].tolist()) + "\n"


def test_more_sequences_than_texts_are_refused(pair):
    """More return sequences than the texts of max_new_tokens there are (V ** n) were the search's empty slots:
    copies of other texts scored -1e9, returned as beams."""
    _, model = pair
    idx = prompts(0)[:1]
    with pytest.raises(UserError, match=f"num_return_sequences {V + 1} is more than the {V} texts of max_new_tokens 1"):
        beam_search(model, idx, 1, V + 1, num_return_sequences=V + 1)
    ids, scores = beam_search(model, idx, 1, V + 1, num_return_sequences=V)  # every text, each once
    assert len(set(map(tuple, ids.tolist()))) == V and scores.min() > -1e8


def test_an_eos_leaves_fewer_texts_to_return():
    """A text ends at its first EOS: of 3 tokens and 2 new ones there are 7 ([eos], then 2 x 3), not 3 ** 2 = 9, and
    the 8th and 9th were empty slots scored -1e9 (as length-penalized, -5e8), returned as beams."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=3, context_length=8, n_embd=16, n_layer=1, n_head=2)).eval()
    idx = torch.tensor([[1, 2]])
    with pytest.raises(UserError, match=r"num_return_sequences 8 is more than the 7 texts of max_new_tokens 2 there "
                                        r"are \(a text ends at its first EOS, id 0\)"):
        beam_search(model, idx, 2, 8, num_return_sequences=8, eos_id=0)
    ids, scores = beam_search(model, idx, 2, 7, num_return_sequences=7, eos_id=0)  # every text, each once
    texts = {tuple(row[2:row[2:].index(0) + 3] if 0 in row[2:] else row[2:]) for row in ids.tolist()}
    assert len(texts) == 7 and scores.min() > -1e8
    ids, scores = beam_search(model, idx, 2, 9, num_return_sequences=9)  # without an EOS all 9 are texts
    assert len(set(map(tuple, ids.tolist()))) == 9 and scores.min() > -1e8
    # no new token: one text, the prompt, with an EOS or without (it was counted as 3 texts with one)
    from tritongpt.train.beam_search import texts_possible

    assert [texts_possible(3, 0, eos) for eos in (False, True)] == [1, 1] and texts_possible(3, 1, True) == 3


def test_more_end_tokens_leave_fewer_texts_and_end_beams():
    """stop_token_ids (a generation config's other end tokens) end a hypothesis as the EOS does: of 3 tokens, two of
    them ends, and 2 new ones there are 5 texts ([eos], [stop], then 3 after the other token), and a sixth return
    sequence is refused naming both."""
    from tritongpt.train.beam_search import texts_possible

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=3, context_length=8, n_embd=16, n_layer=1, n_head=2)).eval()
    idx = torch.tensor([[1, 2]])
    assert texts_possible(3, 2, 2) == 5 and texts_possible(3, 3, 2) == 2 + 2 + 3 and texts_possible(2, 4, 2) == 2
    with pytest.raises(UserError, match=r"num_return_sequences 6 is more than the 5 texts of max_new_tokens 2 there "
                                        r"are \(a text ends at its first end token, ids \[0, 2\]\)"):
        beam_search(model, idx, 2, 6, num_return_sequences=6, eos_id=0, stop_token_ids=[2])
    ids, scores = beam_search(model, idx, 2, 5, num_return_sequences=5, eos_id=0, stop_token_ids=[2])
    texts = {tuple(next((row[2:j + 1] for j in range(2, 4) if row[j] in (0, 2)), row[2:])) for row in ids.tolist()}
    assert texts == {(0,), (2,), (1, 0), (1, 1), (1, 2)} and scores.min() > -1e8


def test_several_end_tokens_equal_transformers(pair):
    """stop_token_ids beside eos_id: transformers' beam search with eos_token_id the list of them, token for token
    and score for score. These cases (3 of 16 found among 756 settings) differ where the search keeps 2 * N
    candidates a step, not transformers' max(2, 1 + ends) * N (3N with 2 ends, 4N with 3)."""
    hf, model = pair
    stopped = 0  # the cases where a stop token, not the EOS, ended a returned beam
    for seed, ranks, num_beams, early_stopping, R in (
            (3, (1, 2, 5), 3, False, 2), (1, (0, 3), 3, "never", 2), (2, (2, 0), 4, "never", 4)):
        idx = prompts(seed)
        ends = [likes(model, idx, r) for r in ranks]
        kw = dict(max_new_tokens=NEW, num_beams=num_beams, length_penalty=2.0, early_stopping=early_stopping,
                  num_return_sequences=R)
        ids, scores = beam_search(model, idx, eos_id=ends[0], stop_token_ids=ends[1:], **kw)
        want_ids, want_scores = theirs(hf, idx, ends, **kw)
        assert torch.equal(ids, want_ids) and torch.allclose(scores, want_scores, rtol=0, atol=1e-5), seed
        stopped += any(t in ends[1:] for t in ids[:, T:].flatten().tolist())
    assert stopped == 2


@pytest.mark.parametrize("extra,said", [
    (["--temperature", "0.7"], "--num-beams (beam search) does not take --temperature"),
    (["--top-k", "5"], "does not take --top-k"),
    (["--top-p", "0.9"], "does not take --top-p"),
    (["--min-p", "0.1"], "does not take --min-p"),
    (["--typical-p", "0.9"], "does not take --typical-p"),
    (["--epsilon-cutoff", "3e-4"], "does not take --epsilon-cutoff"),
    (["--eta-cutoff", "2e-3"], "does not take --eta-cutoff"),
    (["--top-n-sigma", "1.5"], "does not take --top-n-sigma"),
    (["--frequency-penalty", "0.5"], "does not take --frequency-penalty"),
    (["--presence-penalty", "0.5"], "does not take --presence-penalty"),
    (["--stop", "x"], "does not take --stop"),
    (["--stream"], "does not take --stream"),
    (["--draft", "d.safetensors"], "does not take --draft"),
    (["--num-samples", "2"], "does not take --num-samples"),
    (["--allowed-token-ids", "1,2"], "does not take --allowed-token-ids: the search scores"),
    (["--bad-words", "cat"], "does not take --bad-words"),
    (["--num-return-sequences", "4"], "--num-return-sequences must be an integer in [1, --num-beams 3]"),
    (["--num-return-sequences", "0"], "--num-return-sequences must be an integer in [1, --num-beams 3]"),
    (["--num-beams", "0"], "--num-beams must be a positive integer"),
    (["--length-penalty", "inf"], "--length-penalty must be a finite number"),
    (["--max-new-tokens", "40"], "prompt 3 + --max-new-tokens 40 - 1 > context length 32"),
    (["--max-new-tokens", "0", "--num-return-sequences", "2"], "--num-return-sequences 2 with --max-new-tokens 0: "
                                                               "no token is generated, so there is one text"),
])
def test_the_generate_command_refuses_by_name(saved, capsys, extra, said):
    from tritongpt import cli

    base = ["generate", "--weights", str(saved), "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "4",
            "--num-beams", "3"]
    assert cli.main([*base, *extra]) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--length-penalty", "2"], ["--early-stopping", "true"],
                                  ["--num-return-sequences", "2"]])
def test_beam_flags_without_beams_are_refused(saved, capsys, flag):
    from tritongpt import cli

    assert cli.main(["generate", "--weights", str(saved), "--prompt", "x", "--device", "cpu", *flag]) == 2
    assert f"{flag[0]} is a beam search setting: pass --num-beams N" in capsys.readouterr().err


@pytest.mark.parametrize("choice,value", [("true", True), ("false", False), ("never", "never"), (None, False)])
def test_the_early_stopping_flag_is_transformers_value(choice, value):
    """--early-stopping's text reaches beam_search as transformers' True / False / "never" (its tests `is True`)."""
    from tritongpt.cli import build_parser
    from tritongpt.commands import check_beam_args

    flags = ["generate", "--prompt", "x", "--num-beams", "2"] + (["--early-stopping", choice] if choice else [])
    args = build_parser().parse_args(flags)
    beams = check_beam_args(args)
    assert beams["early_stopping"] is value and args.temperature == 0.0
    assert beams == dict(num_beams=2, length_penalty=1.0, early_stopping=value, num_return_sequences=1)


def test_a_longrope_model_crossing_its_original_context_computes_the_cache_again(tmp_path, one_thread):
    """Phi-3's LongRoPE: once the beams pass the original context (8 here) every position is rotated with the
    long factors, so the cached keys (short) are computed again, as transformers' Phi-3 and generate() do."""
    from test_phi3 import VOCAB, hf_phi3, longrope
    from tritongpt.train.gpt2_weights import load_checkpoint

    hf, path = hf_phi3(tmp_path, rope_parameters={**longrope(16), "partial_rotary_factor": 1.0})
    model = load_checkpoint(path).double().eval()
    idx = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(1))
    ids, scores = beam_search(model, idx, 12, 3, num_return_sequences=3)
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, num_beams=3, do_sample=False,
                      num_return_sequences=3, pad_token_id=0, eos_token_id=VOCAB + 1, return_dict_in_generate=True,
                      output_scores=True)
    assert torch.equal(ids, out.sequences)
    assert torch.allclose(scores, out.sequences_scores.float(), rtol=1e-5, atol=1e-5)


def test_a_vocab_limit_leaves_ids_out_after_the_log_softmax(pair):
    """vocab_limit (a tokenizer smaller than the model's vocabulary): the ids past it are never chosen, as
    transformers' suppress_tokens leaves them out: after the log-softmax over the model's whole vocabulary, so a
    beam's score stays its log-probability under the model (a softmax over the kept ids alone would raise each
    beam's by a different amount and could reorder them)."""
    hf, model = pair
    limit = 30
    for seed in (4, 6):
        idx = prompts(seed) % limit
        eos = likes(model, idx, 1) % limit
        kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, length_penalty=0.5)
        ids, scores = beam_search(model, idx, eos_id=eos, vocab_limit=limit, **kw)
        want_ids, want_scores = theirs(hf, idx, eos, suppress_tokens=list(range(limit, V)), **kw)
        assert (ids < limit).all() and torch.equal(ids, want_ids)
        assert torch.allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
