"""The engine's batched draw (generate.sample_rows, Engine._draw_plain): a step's plain decode requests drawn in one
pass with per-row settings. A seeded request's tokens (and logprobs) are exactly those it drew alone, whatever
else is in the batch; greedy rows are argmaxes; unseeded rows follow each row's own distribution."""

import pytest
import torch

import tritongpt.train.engine as engine_module
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.engine import Engine
from tritongpt.train.generate import sample_next, sample_rows, sampling_logits

pytestmark = pytest.mark.usefixtures("one_thread")

# where the differential tests run: the CPU always (through Triton's interpreter), the GPU where there is one (the
# batched draw's CUDA branch, a Python float's division as torch's CUDA kernel makes it, and the real kernel)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# one request each: settings that differ in every cut the pass takes a row at a time, both min_p orders, a greedy one
WARPS = [dict(temperature=0.5, top_p=0.6, min_p_first=True),
         dict(temperature=1.7, top_k=3),
         dict(temperature=1.0, min_p=0.2, top_p=0.9),
         dict(temperature=0.0, top_k=2),
         dict(temperature=0.8, top_k=5, min_p=0.1, top_p=0.8, min_p_first=True),
         dict(temperature=2.5)]


@pytest.mark.parametrize("dev,V,steps", [("cpu", 11, 30), pytest.param("cuda", 11, 30, marks=pytest.mark.cuda),
                                          pytest.param("cuda", 50257, 4, marks=pytest.mark.cuda)])
def test_seeded_rows_draw_what_each_request_draws_alone(dev, V, steps):
    """Request by request with sample_next (the engine's draw before the batching) and all at once with sample_rows:
    the same tokens at every step, and each generator left in the same state (a greedy request's untouched).
    On CUDA it settles what sample_rows' docstring argues from torch's source: the temperature as the fp32
    reciprocal the CUDA kernel multiplies by, the row-subset softmaxes, topk and float64 cumsum round each row as a
    request's own rows alone do, so a seeded request's tokens are token-exact batched (at 11 tokens and at GPT-2's
    50,257). (A differential of tokens: a 1-ulp difference in the cut logits rarely moves a draw, so it settles the
    tokens, not the bits of the logits.)"""
    sizes = [2, 1, 3, 1, 2, 1]
    alone = [torch.Generator(dev).manual_seed(10 + j) for j in range(len(WARPS))]
    together = [torch.Generator(dev).manual_seed(10 + j) for j in range(len(WARPS))]
    logits = (torch.randn(steps, sum(sizes), V, generator=torch.Generator().manual_seed(0)) * 2).to(dev)
    for step in logits:
        want, row = [], 0
        for w, g, n in zip(WARPS, alone, sizes):
            want.append(sample_next(step[row:row + n], generator=g, **w))
            row += n
        assert torch.equal(sample_rows(step, WARPS, together, sizes), torch.cat(want))
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(alone, together))


def test_unseeded_rows_follow_each_rows_own_distribution():
    """Many rows of each request (one logits row each, drawn 3000 times) against softmax(sampling_logits(row, its
    settings)): a chi-square a request, and no token its cuts removed. A row given another's temperature or cuts
    fails it."""
    torch.manual_seed(0)
    V, draws = 6, 3000
    base = torch.randn(len(WARPS), V, generator=torch.Generator().manual_seed(1)) * 1.5
    got = sample_rows(base.repeat_interleave(draws, 0), WARPS, [None] * len(WARPS), [draws] * len(WARPS))
    for j, w in enumerate(WARPS):
        counts = torch.bincount(got[j * draws:(j + 1) * draws, 0], minlength=V).double()
        if w["temperature"] == 0.0:
            assert torch.equal(counts, torch.eye(V, dtype=torch.double)[base[j].argmax()] * draws)
            continue
        p = torch.softmax(sampling_logits(base[j:j + 1], **w).double(), dim=-1)[0]
        assert counts[p == 0].sum() == 0, (j, counts, p)  # (a cut token never drawn)
        kept = p > 0
        chi2 = ((counts[kept] - draws * p[kept]) ** 2 / (draws * p[kept])).sum()
        assert chi2 < 25, (j, chi2, counts, p * draws)  # (5 degrees of freedom at most: p ~ 1e-4)


# every sampling setting sample_next takes beyond the temperature and the row cuts, at the value that turns it off
# (check_sampling's)
NEUTRAL = dict(typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, frequency_penalty=0.0,
               presence_penalty=0.0, no_repeat_ngram_size=0, logit_bias={}, bad_words=[])


def tiny():
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=50, context_length=32, n_embd=32, n_layer=1, n_head=2, tie_weights=False,
                              kernels="reference")).eval()


def served(model, batched: bool, monkeypatch, pass_rows=None):
    """The engine's tokens and on_token calls for mixed requests in one batch: each request's draw alone (the
    engine before the batching: _draw_plain drawing nothing) or batched (pass_rows: a CPU pass's logits cut to that
    many rows of the model's vocabulary). The generators on the model's device."""
    dev = next(model.parameters()).device
    with monkeypatch.context() as m:
        calls = []
        if pass_rows is not None:
            m.setattr(engine_module, "SAMPLE_PASS_CPU", pass_rows * 50)
        if not batched:
            m.setattr(Engine, "_draw_plain", lambda self, logits, drafts: {})
        else:  # (the batched path taken: its rows counted)
            m.setattr(engine_module, "sample_rows",
                      lambda logits, *a, **k: calls.append(logits.size(0)) or sample_rows(logits, *a, **k))
        engine = Engine(model, max_batch=12)
        # (logprobs with a penalty: taken from the raw logits, not the drawn ones; min_tokens holding back an EOS
        # its bias makes likely; every setting at its "off" value spelled out, NEUTRAL: plain requests still)
        extra = [dict(logprobs=2, presence_penalty=1.5),
                 dict(repetition_penalty=1.3, eos_id=7, min_tokens=3, logit_bias={7: 4.0}),
                 dict(logit_bias={3: 2.0}, typical_p=1.0), dict(logprobs=1),
                 dict(frequency_penalty=0.5, epsilon_cutoff=0.0, eta_cutoff=0),
                 dict(stop_token_ids=[9], eos_id=7, min_tokens=0, top_p=1.0, min_p=0.0, **NEUTRAL)]
        handles = []
        for j, (w, n) in enumerate(zip(WARPS, [2, 1, 3, 1, 2, 1])):
            ids = torch.randint(0, 50, (1, 4 + j), generator=torch.Generator().manual_seed(j)).expand(n, -1)
            handles.append(engine.submit(ids, 6, generator=torch.Generator(dev).manual_seed(j), **w, **extra[j]))
        handles.append(engine.submit(torch.tensor([[1, 2, 3]]), 6, temperature=0.9))  # an unseeded one beside
        while engine.running or engine.waiting:
            engine.step()
        streams = []
        for h in handles[:-1]:
            stream = []
            out = h.wait(lambda *item: stream.append(item))
            streams.append((out, stream))
        assert handles[-1].wait().shape == (1, 9)
        return streams, calls


@pytest.mark.parametrize("dev,pass_rows", [("cpu", None), ("cpu", 3),
                                           pytest.param("cuda", None, marks=pytest.mark.cuda)])
def test_the_engine_batched_draw_gives_each_seeded_request_its_own_tokens_and_logprobs(monkeypatch, dev, pass_rows):
    """The same requests, drawn a request at a time and batched: equal ids and on_token calls (tokens, logprobs'
    values and top ids), greedy and sampled, with penalties, a bias, min_tokens, stop tokens, in one batch; and
    with a CPU's passes cut to 3 rows (SAMPLE_PASS_CPU). Requests naming typical_p 1 or a cutoff 0 (which cut
    nothing) draw in the batched pass too (they drew alone). On CUDA (one pass a step: no SAMPLE_PASS_CPU there)
    it settles that the engine's batched draw and post-draw give a seeded request its tokens and logprobs
    bit-exact against decode_step's per-request draw on the device."""
    model = tiny().to(dev)
    want, _ = served(model, False, monkeypatch)
    got, calls = served(model, True, monkeypatch, pass_rows)
    # (the batched path taken: every request's rows, 11, in one pass a step, or passes of at most 3 rows)
    assert calls and (max(calls) == 11 if pass_rows is None else max(calls) == 3 and len(calls) > 4)
    for (ids, stream), (ids_, stream_) in zip(got, want):
        assert torch.equal(ids, ids_) and len(stream) == len(stream_)
        for item, item_ in zip(stream, stream_):
            assert torch.equal(item[0], item_[0])
            if len(item) > 1:
                assert all(torch.equal(a, b) for a, b in zip(item[1], item_[1]))


def test_a_sampled_requests_generator_the_draw_cannot_use_is_refused_at_submit():
    """A generator torch.rand refuses (a seed passed for one; a Generator on another device) would fail every
    request of the step's batched pass, not its own alone: submit refuses it by name. A greedy request draws nothing
    from its generator: it runs as before, beside a seeded one."""
    engine, ids = Engine(tiny(), max_batch=4), torch.tensor([[1, 2, 3]])
    with pytest.raises(UserError, match=r"generator must be a torch.Generator on the engine's device \(cpu\), "
                                        r"got int"):
        engine.submit(ids, 3, generator=1234, temperature=1.0)
    assert not engine.waiting
    greedy = engine.submit(ids, 3, generator=1234)
    sampled = engine.submit(ids, 3, generator=torch.Generator().manual_seed(0), temperature=1.0)
    while engine.running or engine.waiting:
        engine.step()
    assert greedy.wait().shape == sampled.wait().shape == (1, 6)


@pytest.mark.parametrize("dev", DEVICES)
def test_the_triton_path_draws_what_each_request_draws_alone_in_one_launch(monkeypatch, dev):
    """triton=True: the sampled rows of every request (mixed settings, both min_p orders, top_k past V) in one launch
    of the sampling kernel, each seeded request's tokens those sample_next(triton=True) draws for it alone (a launch
    a request), greedy rows the argmax, and each generator left in the same state. A top_p of 1e-50 (0 in fp32)
    keeps the likeliest token, as sample_tokens' does. On CUDA it settles that the compiled per-row kernel, fed
    host settings without waiting, draws the compiled scalar kernel's tokens."""
    import tritongpt.kernels.sampling as ks
    launches, real = [], ks._launch_rows
    monkeypatch.setattr(ks, "_launch_rows", lambda *a: launches.append(a[0].size(0)) or real(*a))
    warps = WARPS + [dict(temperature=1.2, top_k=500, top_p=1.0), dict(temperature=0.9, top_p=1e-50)]
    sizes, V = [2, 1, 3, 1, 2, 1, 1, 2], 101
    alone = [torch.Generator(dev).manual_seed(20 + j) for j in range(len(warps))]
    together = [torch.Generator(dev).manual_seed(20 + j) for j in range(len(warps))]
    step = (torch.randn(sum(sizes), V, generator=torch.Generator().manual_seed(3)) * 2).to(dev)
    want, row = [], 0
    for w, g, n in zip(warps, alone, sizes):
        want.append(sample_next(step[row:row + n], generator=g, triton=True, **w))
        row += n
    got = sample_rows(step, warps, together, sizes, triton=True)
    assert torch.equal(got, torch.cat(want)) and len(set(got.flatten().tolist())) > 4
    assert launches == [sum(sizes) - 1]  # (the greedy request's row: an argmax, not the kernel's)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(alone, together))


@pytest.mark.parametrize("dev", DEVICES)
def test_the_engine_with_triton_sampling_draws_a_step_in_one_launch(monkeypatch, dev):
    """Triton sampling on (sampling_with_triton, forced here: the model's forward stays the reference's): the
    engine's plain requests, greedy and seeded of mixed settings, draw in one launch of the sampling kernel a step,
    the very tokens each request drew alone with a launch of its own (decode_step's sample_next(triton=True)).
    On CUDA: the same through the engine on the device, the real kernels."""
    import tritongpt.kernels.sampling as ks
    model = tiny().to(dev)
    # (the third naming typical_p 1 and the cutoffs 0: no cut, so in the batch's launch)
    warps = [WARPS[0], WARPS[3], {**WARPS[4], "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}]

    def serve(batched):
        per_row, scalar = [], []
        with monkeypatch.context() as m:
            m.setattr(engine_module, "sampling_with_triton", lambda model: True)
            rows, one = ks._launch_rows, ks._launch
            m.setattr(ks, "_launch_rows", lambda *a: per_row.append(a[0].size(0)) or rows(*a))
            m.setattr(ks, "_launch", lambda *a: scalar.append(a[0].size(0)) or one(*a))
            if not batched:
                m.setattr(Engine, "_draw_plain", lambda self, logits, drafts: {})
            engine = Engine(model, max_batch=6)
            handles = [engine.submit(torch.randint(0, 50, (1, 4 + j), generator=torch.Generator().manual_seed(j))
                                     .expand(n, -1), 3, generator=torch.Generator(dev).manual_seed(j), **w)
                       for j, (w, n) in enumerate(zip(warps, [2, 1, 2]))]
            steps = 0
            while engine.running or engine.waiting:
                engine.step()
                steps += 1
            return [h.wait() for h in handles], per_row, scalar, steps
    want, per_row_, scalar_, _ = serve(False)
    got, per_row, scalar, steps = serve(True)
    assert per_row_ == [] and scalar_ == [2, 2] * 3  # (alone: a launch for each sampled request a step)
    # (batched: its 4 sampled rows in one launch a step)
    assert scalar == [] and per_row == [4] * 3, (per_row, steps)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_temperature_past_fp32s_range_is_refused_at_submit():
    """A temperature of 1e39 is inf in fp32 (the kernel's settings, the logits' division): submit refuses it by
    name (check_sampling), so it never reaches a batch, where the kernel's refusal of the inf failed the requests
    drawn beside it, nor the scalar launch, where Triton crashed on it."""
    engine = Engine(tiny(), max_batch=4)
    with pytest.raises(UserError, match="temperature must be at most fp32's largest"):
        engine.submit(torch.tensor([[4, 5]]), 2, generator=torch.Generator().manual_seed(1), temperature=1e39)
    assert not engine.running and not engine.waiting


def test_late_cuts_at_their_off_values_take_the_fused_triton_draw(monkeypatch):
    """sample_next(triton=True) with typical_p 1, epsilon_cutoff 0 or eta_cutoff 0 (no cut) draws as without them:
    the kernel given the temperature and cuts (the fused draw, which the engine's batched launch matches), not
    sampling_logits' cut logits at temperature 1; a real late cut still goes that way."""
    import tritongpt.kernels.sampling as ks
    temps, real = [], ks._launch
    monkeypatch.setattr(ks, "_launch", lambda *a: temps.append(a[3]) or real(*a))
    logits = torch.randn(3, 37, generator=torch.Generator().manual_seed(4)) * 2
    w = dict(temperature=0.7, top_p=0.8, top_k=9)
    want = sample_next(logits, generator=torch.Generator().manual_seed(5), triton=True, **w)
    for off in (dict(typical_p=1.0), dict(epsilon_cutoff=0.0), dict(eta_cutoff=0), NEUTRAL):
        got = sample_next(logits, generator=torch.Generator().manual_seed(5), triton=True,
                          seen=torch.randint(0, 37, (3, 4)), generated_from=0, **w, **off)
        assert torch.equal(got, want), off
    sample_next(logits, generator=torch.Generator().manual_seed(5), triton=True, typical_p=0.9, **w)
    assert temps == [pytest.approx(0.7)] * 5 + [1.0]


def test_a_batched_pass_that_fails_fails_only_the_request_whose_draw_fails(monkeypatch):
    """One request's draw fails (injected: the batched pass raises after its torch.rand, as a failure surfacing late
    would, whenever that request is in it; and its own draw alone raises too): only its client gets the error. The
    requests beside it draw alone for that step, their generators put back, so each seeded one's tokens are those of
    a run where nothing failed (the pass's error failed them all)."""
    import tritongpt.train.generate as generate_module
    model = tiny()
    BAD = 0.77  # (the failing request's temperature: how the injected failure finds it)

    def run():
        engine = Engine(model, max_batch=8)
        asks = [(dict(WARPS[0], logprobs=2), 2), (dict(temperature=BAD), 1), (WARPS[3], 1), (WARPS[4], 2)]
        handles = [engine.submit(torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(j))
                                 .expand(n, -1), 5, generator=torch.Generator().manual_seed(j), **w)
                   for j, (w, n) in enumerate(asks)]
        while engine.running or engine.waiting:
            engine.step()
        return handles
    want = [h.wait() for h in run()]
    rows, alone = engine_module.sample_rows, generate_module.sample_next

    def failing_rows(logits, warps, *a, **k):
        nxt = rows(logits, warps, *a, **k)  # (the generators drawn from first)
        if any(w.get("temperature") == BAD for w in warps):
            raise RuntimeError("a broken draw")
        return nxt

    def failing_alone(logits, **k):
        if k.get("temperature") == BAD:
            raise RuntimeError("a broken draw")
        return alone(logits, **k)
    monkeypatch.setattr(engine_module, "sample_rows", failing_rows)
    monkeypatch.setattr(generate_module, "sample_next", failing_alone)
    got = run()
    with pytest.raises(RuntimeError, match="a broken draw"):
        got[1].wait()
    for j in (0, 2, 3):
        assert torch.equal(got[j].wait(), want[j]), j
    assert len(set(want[3][:, 4:].flatten().tolist())) > 2  # (sampled: tokens a wrong uniform would change)
