"""The engine's batched work after its batched draw (generate.take_rows, Engine._take_plain): the plain requests'
tokens and done rows read to the host in one copy a step, EOS padding and ends decided there, logprobs taken once
for the rows of each width and k. The same tokens, logprobs, ends and stops as take_step a request at a time."""
import pytest
import torch

import tritongpt.train.engine as engine_module
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")

# where the tests run: the CPU always, the GPU where there is one (the one copy to the host a step is a real wait
# there, and the logprobs run on the device)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def tiny():
    torch.manual_seed(0)  # (12 tokens: an EOS or a stop token drawn within a few steps)
    return GPTModel(GPTConfig(vocab_size=12, context_length=32, n_embd=32, n_layer=1, n_head=2, tie_weights=False,
                              kernels="reference")).eval()


def stop_on(token, start):
    """A stop rule as serve's stop strings give one: it reads the ids on the host, a CPU tensor of bools back."""
    return lambda idx: torch.tensor([token in row[start:] for row in idx.tolist()])


def session(model, batched: bool, monkeypatch):
    """Mixed requests served in one batch: each one's ids, on_token calls, the step it finished at and its rows
    done, with the batched post-draw on or off (take_step a request at a time)."""
    with monkeypatch.context() as m:
        if not batched:  # (each drawn request then takes its step alone: take_step)
            m.setattr(Engine, "_take_plain", lambda self, logits, drawn: {})
        return serve_session(model)


def serve_session(model):
    """session's requests on a fresh engine, served to their ends (the generators on the model's device)."""
    engine, P, dev = Engine(model, max_batch=16), 4, next(model.parameters()).device
    asks = [dict(n=3, eos_id=3, temperature=1.0, logprobs=3),  # rows ending at different steps: padded after
            dict(n=2, eos_id=3, stop_token_ids=[5], temperature=0.7, logprobs=0),
            dict(n=2, eos_id=3, min_tokens=4, logit_bias={3: 3.0}, temperature=0.9),  # the EOS held back, then likely
            dict(n=2, stop=stop_on(7, P), temperature=1.2, logprobs=3),  # a stop rule, no EOS: nothing padded
            dict(n=2, eos_id=3, stop=stop_on(8, P), temperature=1.1, logprobs=3, vocab_limit=10),  # another width
            dict(n=1, logprobs=3, temperature=0.8),  # nothing read to the host for it
            dict(n=2, eos_id=3, ignore_eos=True, stop_token_ids=[6], temperature=1.0),
            dict(n=1, eos_id=3, temperature=0.0, logprobs=2),  # greedy
            dict(n=1, eos_id=3, temperature=1.0, typical_p=0.9)]  # (decode_step's, beside)
    handles = []
    for j, a in enumerate(asks):
        n = a.pop("n")
        ids = torch.randint(0, 12, (1, P), generator=torch.Generator().manual_seed(j)).expand(n, -1)
        handles.append(engine.submit(ids, 10, generator=torch.Generator(dev).manual_seed(100 + j), **a))
    ended_at, step = {}, 0
    while engine.running or engine.waiting:
        engine.step()
        step += 1
        for j, h in enumerate(handles):
            if h not in engine.running and h not in engine.waiting:
                ended_at.setdefault(j, step)
    out = []
    for j, h in enumerate(handles):
        stream = []
        ids = h.wait(lambda *item: stream.append(item))
        out.append((ids, stream, ended_at[j], h.done.tolist(), h.ended))
    return out


@pytest.mark.parametrize("dev", DEVICES)
def test_the_batched_post_draw_gives_what_take_step_gives_a_request_at_a_time(monkeypatch, dev):
    """EOS and its padding (rows of a request ending at different steps), stop_token_ids, min_tokens, stop rules with
    and without an EOS, ignore_eos, two vocab widths, logprobs 0, 2 and 3: equal ids, tokens and logprobs (values
    and top ids, bitwise), the same step each request finished at and the same rows done. On CUDA it settles that
    take_rows' one host copy, its padded tokens sent back without waiting and its logprobs of a width's rows
    together give take_step's very results on the device (the log-softmax and topk a row's own there too)."""
    model = tiny().to(dev)
    calls = []
    real = engine_module.take_rows
    monkeypatch.setattr(engine_module, "take_rows", lambda *a: calls.append(len(a[0])) or real(*a))
    want = session(model, False, monkeypatch)
    assert not calls
    got = session(model, True, monkeypatch)
    assert calls and max(calls) == 8  # (every plain request's rows taken together; the typical_p one alone)
    # (the session did what it is there for: an EOS padded rows, and a request ended before its budget)
    assert any(e is not None and any(e) and not all(e) for *_, e in got)
    assert min(at for _, _, at, _, _ in got) < max(at for _, _, at, _, _ in got)
    for (ids, stream, at, done, ended), (ids_, stream_, at_, done_, ended_) in zip(got, want):
        assert torch.equal(ids, ids_) and (at, done, ended) == (at_, done_, ended_)
        assert len(stream) == len(stream_)
        for item, item_ in zip(stream, stream_):
            assert len(item) == len(item_) and torch.equal(item[0], item_[0])
            if len(item) > 1:
                assert len(item[1]) == len(item_[1]) == 3
                assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(item[1], item_[1]))


@pytest.mark.parametrize("dev", DEVICES)
def test_a_step_of_plain_requests_reads_the_host_once(monkeypatch, dev):
    """A step of 6 plain requests with an EOS: a constant number of tolist/item/cpu calls (on a GPU each a wait
    for the device), not take_step's done.tolist() a request: the step's one read, and sample_rows' read of its
    host tensor of temperatures. On CUDA it settles that no CUDA-only branch of the step (sample_rows' reciprocal
    temperatures, the engine's device tensors) adds a read."""
    model = tiny().to(dev)
    engine = Engine(model, max_batch=8)
    for j in range(6):
        engine.submit(torch.tensor([[1 + j, 2, 4]]), 3, eos_id=11, ignore_eos=True, temperature=0.5 + 0.1 * j,
                      generator=torch.Generator(dev).manual_seed(j), logprobs=2 if j % 2 else None)
    reads = []
    for name in ("tolist", "item", "cpu"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _real=real, **k: reads.append(1) or _real(self, *a, **k))
    per_step = []
    while engine.running or engine.waiting:
        reads.clear()
        engine.step()
        per_step.append(len(reads))
    monkeypatch.undo()
    assert len(per_step) == 3 and max(per_step) <= 2, per_step


def test_a_failing_logprob_group_fails_only_its_request(monkeypatch):
    """One request's logprobs fail (injected: step_logprobs raising for its k, batched or alone): its client gets
    the error, and the requests taken beside it (logprobs of another k, none, an EOS, a stop rule) go on, taken
    alone that step (take_step), with the ids and on_token calls of a run where nothing failed (take_rows' error
    failed every request of the step)."""
    import tritongpt.train.generate as generate_module
    model = tiny()

    def run():
        engine = Engine(model, max_batch=8)
        asks = [dict(n=2, eos_id=3, temperature=1.0, logprobs=2), dict(n=1, temperature=0.9, logprobs=5),
                dict(n=2, temperature=1.1), dict(n=1, stop=stop_on(7, 4), temperature=1.2, logprobs=2)]
        handles = []
        for j, a in enumerate(asks):
            n = a.pop("n")
            ids = torch.randint(0, 12, (1, 4), generator=torch.Generator().manual_seed(j)).expand(n, -1)
            handles.append(engine.submit(ids, 6, generator=torch.Generator().manual_seed(100 + j), **a))
        while engine.running or engine.waiting:
            engine.step()
        return handles

    def streams(handles, skip):
        out = []
        for j, h in enumerate(handles):
            if j != skip:
                stream = []
                out.append((h.wait(lambda *item: stream.append(item)), stream))
        return out
    want = streams(run(), 1)
    real = generate_module.step_logprobs

    def failing(logits, nxt, k, *a):
        if k == 5:
            raise RuntimeError("a broken logprob")
        return real(logits, nxt, k, *a)
    monkeypatch.setattr(generate_module, "step_logprobs", failing)
    handles = run()
    with pytest.raises(RuntimeError, match="a broken logprob"):
        handles[1].wait()
    got = streams(handles, 1)
    for (ids, stream), (ids_, stream_) in zip(got, want):
        assert torch.equal(ids, ids_) and len(stream) == len(stream_) > 0
        for item, item_ in zip(stream, stream_):
            assert len(item) == len(item_) and torch.equal(item[0], item_[0])
            if len(item) > 1:
                assert all(torch.equal(a, b) for a, b in zip(item[1], item_[1]))
