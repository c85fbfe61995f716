"""CUDA-graph decoding (train/generate.py DecodeGraph, generate(cuda_graph=True)) and the host-int-free decode step
it captures (KVCache.on_device: the fill on the device, keys written with index_copy_, attention over the whole
buffer with kv_len).

On the CPU a CUDA graph is emulated by make_fx: it records the step's tensor ops once, with every host int and
Python decision of that one run baked in, and a tensor value read on the host refused (as a capture refuses a
sync); replaying the recorded graph runs those ops on the same tensors (the cache, the token buffer, cache.fill)
again. A decode step that depended on a host int (the cache's pos) would then replay the position it was recorded
at and draw other tokens."""
import pytest
import torch
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from parity import assert_close_rel, greedy_steps, loud_attention
import tritongpt.train.generate as gen
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel

VOCAB = 97

CASES = {
    "gpt2": dict(),
    "rope-gqa": dict(position_encoding="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu"),
    "alibi": dict(position_encoding="alibi"),
    "window-softcap": dict(attention_window=4, attn_softcap=5.0),
}


def tiny(kernels="reference", context_length=24, n_layer=2, **extra):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, context_length=context_length, n_layer=n_layer, n_head=4, n_embd=64,
                    kernels=kernels, **extra)
    return GPTModel(cfg).eval()


def fx_capture(fn, device=None):
    """A CUDA graph's semantics on the CPU: fn's tensor ops recorded once, replayed without fn's Python."""
    # make_fx on real tensors builds a fresh FakeTensorMode (with its stack trace) for each op's metadata unless a
    # tracing context holds one: this one is used for that metadata only (measured: ~45% of a capture's time)
    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
        recorded = make_fx(lambda: fn())()
    return lambda: recorded()


def weight_cache_asks(monkeypatch):
    """The weight_cache every DecodeGraph built from now on asks for, in order (a list this fills)."""
    asked = []
    real = gen.DecodeGraph.__init__

    def init(self, model, cache, capture=None, weight_cache=False):
        asked.append(weight_cache)
        real(self, model, cache, capture, weight_cache)
    monkeypatch.setattr(gen.DecodeGraph, "__init__", init)
    return asked


def warm_then_fx(fn, device=None):
    """As capture_cuda_graph: two warm-up runs of the step before the capture (their writes must not show)."""
    fn()
    fn()
    return fx_capture(fn)


def assert_cached_and_graph_greedy_match_uncached(monkeypatch, model, idx, name: str, steps: int = 4):
    """Greedy decoding with the KV cache, eager and through an emulated graph, against no cache: the same tokens and
    each step's logits (the tokens alone are blind: a graph replaying its capture's position drew them)."""
    want, want_logits = greedy_steps(model, idx, steps, use_cache=False)
    monkeypatch.setattr(gen, "capture_cuda_graph", warm_then_fx)
    for graph in (False, True):
        got, logits = greedy_steps(model, idx, steps, cuda_graph=graph)
        assert torch.equal(got, want)
        assert_close_rel(logits, want_logits, 1e-5, f"{name}'s decode logits, graph {graph}")


@pytest.mark.parametrize("kernels,case", [("reference", c) for c in CASES] + [("triton", "rope-gqa"),
                                                                             ("triton", "window-softcap")])
def test_a_step_on_the_device_gives_the_host_steps_logits_whatever_the_cache_holds_past_its_fill(kernels, case):
    """KVCache.on_device: the same logits as the host-int step, position after position, though the cache past the
    fill holds NaN (never read into a result: the reference masks the scores and zeroes the values there, the
    kernels never load past kv_len)."""
    # interpreted (~0.5 s of CPU a step of both caches at one layer): three positions, each a new fill all the same
    model = tiny(kernels, n_layer=1 if kernels == "triton" else 2, **CASES[case])
    end = 9 if kernels == "triton" else 11
    idx = torch.randint(0, VOCAB, (2, end))
    with torch.no_grad():
        host, dev = model.new_cache(2, 16), model.new_cache(2, 16)
        dev.k.fill_(float("nan"))
        dev.v.fill_(float("nan"))
        model(idx[:, :6], host)
        model(idx[:, :6], dev)
        for t in range(6, end):
            want = model(idx[:, t:t + 1], host)
            dev.fill.fill_(dev.pos)
            dev.on_device = True
            got = model(idx[:, t:t + 1], dev)
            dev.on_device = False
            assert dev.pos == t  # the fill on the device is the caller's to advance (DecodeGraph, the engine)
            dev.pos += 1
            assert not got.isnan().any()
            assert (got - want).abs().max().item() < 1e-5, (case, t)
        assert dev.pos == host.pos == end
        # the device step wrote its keys where the host's did
        assert torch.allclose(dev.k[:, :, :, :end], host.k[:, :, :, :end], atol=1e-6)


# Triton: not "gpt2", whose kernels (LayerNorm, GELU, plain attention over kv_len) "alibi" and "window-softcap" run
# with more on top: ~5 ms a program, ~4 s a case
@pytest.mark.parametrize("kernels,case", [("reference", c) for c in CASES] + [("triton", c) for c in CASES
                                                                             if c != "gpt2"])
def test_generate_with_an_emulated_cuda_graph_draws_the_eager_tokens(monkeypatch, kernels, case):
    """Greedy and sampled, past the context (the window slides: a prefill again, the same graph after it), on both
    paths (the Triton one: flash_attention's kv_len, read in the kernels)."""
    monkeypatch.setattr(gen, "capture_cuda_graph", warm_then_fx)
    # ~5 ms a Triton program: greedy only, one row, one layer (the layers' caches are the reference cases' to
    # check), a shorter context and run
    interpreted = kernels == "triton"
    small = dict(context_length=10, n_layer=1) if interpreted else dict(context_length=24)
    # loud: the plain tiny model's greedy tokens hardly read the cache (the Triton cases drew them with its values
    # zeroed in the graph's steps)
    model = loud_attention(tiny(kernels, **small, **CASES[case]))
    # Triton: the eager tokens are the same weights' on the reference path, which the graph's must equal (drawing
    # them interpreted again cost ~1.5 s a case)
    eager = loud_attention(tiny(**small, **CASES[case])) if interpreted else model
    idx = torch.randint(0, VOCAB, (1 if interpreted else 2, 5))
    new = 8 if interpreted else 25
    for kw in (dict(),) if interpreted else (dict(), dict(temperature=1.0, top_k=20)):
        want = gen.generate(eager, idx, new, generator=torch.Generator().manual_seed(3), **kw)
        got = gen.generate(model, idx, new, generator=torch.Generator().manual_seed(3), cuda_graph=True, **kw)
        assert torch.equal(got, want), (case, kw)


def _graph_step_error(model):
    """The largest difference between a DecodeGraph's logits (its capture emulated) and the eager step's, over
    four steps after a 5-token prefill."""
    idx = torch.randint(0, VOCAB, (2, 9))
    worst = 0.0
    with torch.no_grad():
        host, dev = model.new_cache(2, 12), model.new_cache(2, 12)
        model(idx[:, :5], host)
        model(idx[:, :5], dev)
        graph = gen.DecodeGraph(model, dev, fx_capture)
        for t in range(5, 9):
            want = gen.last_logits(model, idx[:, t:t + 1], host)
            worst = max(worst, (graph(idx[:, t:t + 1]) - want).abs().max().item())
    return worst


def test_the_emulation_catches_a_step_that_bakes_in_the_hosts_position(monkeypatch):
    """The tests above would pass with any step if the emulation re-ran the step's Python: a step whose positions
    and fill come from the host's pos (a host int, as a CUDA graph would freeze it) must replay other logits."""
    from tritongpt.model.gpt import KVCache

    model = tiny()
    assert _graph_step_error(model) < 1e-5
    monkeypatch.setattr(KVCache, "extent", lambda self, T: (torch.arange(self.pos, self.pos + T),
                                                            torch.full((1,), self.pos + T)))
    assert _graph_step_error(model) > 1e-3


def test_decode_graph_steps_one_position_a_call_and_restores_the_warm_up():
    """The warm-up steps (two, then the capture) leave pos as it was; each call sets the fill to pos before the
    replay and advances pos by one after it; the logits match the eager step's."""
    model = tiny(**CASES["rope-gqa"])
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        host, dev = model.new_cache(2, 12), model.new_cache(2, 12)
        model(idx[:, :5], host)
        model(idx[:, :5], dev)
        graph = gen.DecodeGraph(model, dev, warm_then_fx)
        assert dev.pos == 5 and not dev.on_device
        for t in range(5, 9):
            want = gen.last_logits(model, idx[:, t:t + 1], host)
            got = graph(idx[:, t:t + 1])
            assert dev.pos == t + 1 and int(dev.fill) == t
            assert got.shape == (2, 1, VOCAB)
            assert (got - want).abs().max().item() < 1e-5
        dev.crop(6)  # a crop (or reset) is a host pos: the next call steps from it
        host.crop(6)
        want = gen.last_logits(model, idx[:, 6:7], host)
        assert (graph(idx[:, 6:7]) - want).abs().max().item() < 1e-5


def test_decode_graph_refuses_what_it_cannot_replay():
    model = tiny()
    with torch.no_grad():
        cache = model.new_cache(1, 4)
        model(torch.randint(0, VOCAB, (1, 4)), cache)
        with pytest.raises(UserError, match="the KV cache is full"):
            gen.DecodeGraph(model, cache, fx_capture)
        cache.crop(3)
        graph = gen.DecodeGraph(model, cache, fx_capture)
        with pytest.raises(UserError, match=r"steps \(1, 1\) tokens \(one a row\), got \(1, 2\)"):
            graph(torch.zeros(1, 2, dtype=torch.long))
        graph(torch.zeros(1, 1, dtype=torch.long))
        with pytest.raises(UserError, match=r"KV cache overflow: 5 positions > capacity 4"):
            graph(torch.zeros(1, 1, dtype=torch.long))
        with pytest.raises(UserError, match=r"row_fill needs a fill a row \(\[2\]\), got shape \(1,\)"):
            gen.DecodeGraph(model, model.new_cache(2, 4), fx_capture, row_fill=True)
    longrope = tiny(position_encoding="rope", rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 12})
    with pytest.raises(UserError, match="does not take LongRoPE models"):
        gen.DecodeGraph(longrope, longrope.new_cache(1, 8), fx_capture)
    moe = tiny(position_encoding="rope", norm="rmsnorm", mlp="swiglu", n_experts=4, experts_per_token=2)
    with pytest.raises(UserError, match="does not take mixture-of-experts models"):
        gen.DecodeGraph(moe, moe.new_cache(1, 8), fx_capture)


def test_a_step_that_reads_a_value_on_the_host_is_refused_by_name(monkeypatch):
    """A capture refuses a host sync; so does the emulation, and DecodeGraph says which model could not be captured."""
    model = tiny()
    real = model.hidden

    def hidden_with_a_sync(idx, cache=None, doc_ids=None):
        int(idx.sum())  # a value read on the host
        return real(idx, cache, doc_ids)
    monkeypatch.setattr(model, "hidden", hidden_with_a_sync)
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        with pytest.raises(UserError, match="decode step could not be captured in a CUDA graph"):
            gen.DecodeGraph(model, cache, fx_capture)
        assert cache.pos == 0 and not cache.on_device


def test_generate_refuses_cuda_graph_where_it_has_no_meaning(monkeypatch):
    model = tiny()
    idx = torch.randint(0, VOCAB, (1, 4))
    with pytest.raises(UserError, match="CUDA graphs need the model on a CUDA device; it is on cpu"):
        gen.generate(model, idx, 3, cuda_graph=True)
    with pytest.raises(UserError, match="takes use_cache=True and no draft or prompt_lookup"):
        gen.generate(model, idx, 3, cuda_graph=True, use_cache=False)
    with pytest.raises(UserError, match="takes use_cache=True and no draft or prompt_lookup"):
        gen.generate(model, idx, 3, cuda_graph=True, prompt_lookup=2)
    with pytest.raises(UserError, match="cuda_graph must be a bool, got 'yes'"):
        gen.generate(model, idx, 3, cuda_graph="yes")
    # one token (the prefill's): no decode step, nothing captured
    monkeypatch.setattr(gen, "capture_cuda_graph", lambda fn, device: pytest.fail("captured without a decode step"))
    assert gen.generate(model, idx, 1, cuda_graph=True).shape == (1, 5)


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_cuda_graph_decoding_draws_the_eager_tokens_on_cuda(kernels):
    """A real capture and replay (fp32, so the graph's and the eager step's attention differ only in summation
    order): the graph's logits within 1e-4 of the eager step's a step, and the same greedy tokens."""
    model = tiny(kernels, context_length=64, **CASES["rope-gqa"]).cuda()
    idx = torch.randint(0, VOCAB, (2, 7), device="cuda")
    want = gen.generate(model, idx, 40)
    got = gen.generate(model, idx, 40, cuda_graph=True)
    assert torch.equal(got, want)
    with torch.no_grad():
        host, dev = model.new_cache(2, 64), model.new_cache(2, 64)
        model(idx, host)
        model(idx, dev)
        graph = gen.DecodeGraph(model, dev)
        tok = idx[:, -1:]
        for _ in range(20):
            want = gen.last_logits(model, tok, host)
            got = graph(tok)
            assert ((got - want).norm() / want.norm()).item() < 1e-4
            tok = want[:, -1].argmax(-1, keepdim=True)


def test_alibi_bias_and_masks_with_kv_len_are_those_of_the_filled_keys():
    """With kv_len L the reference's ALiBi bias, causal and window masks over a Tk-wide buffer are, on its first L
    columns, those of an L-key attention; the causal mask hides every column past L. (The bias's own position
    cancels in the softmax, so only this shows it.)"""
    from tritongpt.model.layers import alibi_bias, alibi_slopes, in_the_future, outside_window

    slopes = alibi_slopes(4)
    for tq, tk, L in ((1, 16, 9), (3, 16, 9), (2, 10, 10), (3, 8, 3)):
        kv_len = torch.tensor([L])
        assert torch.equal(alibi_bias(slopes, tq, tk, kv_len=kv_len)[..., :L], alibi_bias(slopes, tq, L))
        future = in_the_future(tq, tk, kv_len=kv_len)
        assert torch.equal(future[:, :L], in_the_future(tq, L)) and future[:, L:].all()
        assert torch.equal(outside_window(tq, tk, 3, kv_len=kv_len)[:, :L], outside_window(tq, L, 3))


def test_an_attention_called_alone_on_a_device_cache_rotates_by_the_device_fill():
    """MultiHeadAttention with RoPE called without positions (not through GPTModel, which passes them) on an
    on_device cache, recorded once (fx_capture) and replayed at later fills: q and k rotated at the fill's
    positions, as on the host cache."""
    from tritongpt.model.layers import MultiHeadAttention

    torch.manual_seed(0)
    att = MultiHeadAttention(64, 4, 16, rope_theta=10000.0, n_kv_head=2).eval()
    model = tiny(position_encoding="rope", n_kv_head=2)
    x = torch.randn(2, 9, 64)
    step_in = torch.empty(2, 1, 64)
    with torch.no_grad():
        host, dev = model.new_cache(2, 12), model.new_cache(2, 12)
        att(x[:, :6], host)
        att(x[:, :6], dev)
        host.pos = dev.pos = 6

        def step():
            dev.on_device = True
            try:
                return att(step_in, dev)
            finally:
                dev.on_device = False
        dev.fill.fill_(6)
        step_in.copy_(x[:, 6:7])
        replay = fx_capture(step)
        for t in range(6, 9):
            want = att(x[:, t:t + 1], host)
            host.pos += 1
            dev.fill.fill_(t)
            step_in.copy_(x[:, t:t + 1])
            got = replay()
            assert (got - want).abs().max().item() < 1e-5, t


# -- the command ---------------------------------------------------------------------------------------------

def test_the_generate_command_prints_the_eager_text_with_cuda_graphs(saved, capsys, monkeypatch):
    """--cuda-graphs reaches generate: one capture (emulated here, on the CPU), the eager text."""
    import tritongpt.commands as commands
    from tritongpt import cli

    base = ["generate", "--weights", str(saved), "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert cli.main(base) == 0
    want = capsys.readouterr().out
    captured = []
    monkeypatch.setattr(commands, "check_cuda_graphs", lambda args, device, model: None)  # (past the device check)
    monkeypatch.setattr(gen, "capture_cuda_graph", lambda fn, device: captured.append(device) or fx_capture(fn))
    assert cli.main([*base, "--cuda-graphs"]) == 0
    assert capsys.readouterr().out == want and captured == [torch.device("cpu")]


@pytest.mark.parametrize("extra,said", [
    ([], "--cuda-graphs needs the model on a CUDA device; it is on cpu"),
    (["--prompt-lookup", "2"], "--cuda-graphs replays a one-token decode step: it does not take --draft, "
                               "--prompt-lookup, --prediction or --num-beams"),
    (["--num-beams", "2", "--temperature", "0"],
     "it does not take --draft, --prompt-lookup, --prediction or --num-beams"),
])
def test_the_generate_command_refuses_cuda_graphs_by_name(saved, capsys, extra, said):
    from tritongpt import cli

    base = ["generate", "--weights", str(saved), "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "4",
            "--cuda-graphs"]
    assert cli.main([*base, *extra]) == 2
    assert said in capsys.readouterr().err


def test_the_step_runs_without_autocasts_weight_cache(monkeypatch):
    """Autocast caches its 16-bit casts of the weights: a graph captured with the cache on reads the warm-up's casts,
    stale once the weights change in place (an optimizer step between RLHF rollouts) and freed when the autocast
    region ends (torch's rule for graphed callables: cache_enabled=False). The emulation cannot show it (make_fx
    records the casts either way), so the step's autocast state is checked itself: the same dtype, no cache."""
    model = tiny()
    seen = []
    real = gen.last_logits

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     torch.is_autocast_cache_enabled()))
        return real(*args, **kwargs)
    monkeypatch.setattr(gen, "last_logits", spy)
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        gen.DecodeGraph(model, cache, lambda fn, device: fn)(torch.zeros(1, 1, dtype=torch.long))
        with torch.autocast("cpu", torch.bfloat16):
            cache = model.new_cache(1, 8)
            gen.DecodeGraph(model, cache, lambda fn, device: fn)(torch.zeros(1, 1, dtype=torch.long))
            assert torch.is_autocast_cache_enabled()  # the caller's region as it was
            # weight_cache=True (generate's own graph, dropped inside the region): the caller's cache kept
            cache = model.new_cache(1, 8)
            gen.DecodeGraph(model, cache, lambda fn, device: fn, weight_cache=True)(torch.zeros(1, 1, dtype=torch.long))
    assert seen == [(False, torch.bfloat16, True), (True, torch.bfloat16, False), (True, torch.bfloat16, True)]


def test_generate_keeps_the_weight_cache_for_its_own_graph(monkeypatch):
    """generate's graph lives within the call (inside the caller's autocast region, the weights unchanged): it asks
    for autocast's weight cache, so a replay under autocast casts no weight."""
    asked = weight_cache_asks(monkeypatch)
    monkeypatch.setattr(gen, "capture_cuda_graph", fx_capture)
    gen.generate(tiny(), torch.randint(0, VOCAB, (1, 4)), 3, cuda_graph=True)
    assert asked == [True]


def test_a_device_step_makes_its_positions_once_for_every_layer(monkeypatch):
    """extent(T) (positions and kv_len: three small kernels, each a launch in the graph too) made once a forward,
    not in each layer's cache write and attention; and not kept past the forward."""
    from tritongpt.model.gpt import KVCache

    made = []
    real = KVCache.extent

    def extent(self, T):
        out = real(self, T)
        made.append(out is not self.current)  # made here, not the forward's own
        return out
    monkeypatch.setattr(KVCache, "extent", extent)
    model = tiny(**CASES["rope-gqa"])  # 2 layers
    with torch.no_grad():
        cache = model.new_cache(1, 8)
        model(torch.randint(0, VOCAB, (1, 3)), cache)
        cache.fill.fill_(cache.pos)
        cache.on_device = True
        model(torch.randint(0, VOCAB, (1, 1)), cache)
    assert made.count(True) == 1 and len(made) >= 4 and cache.current is None


def test_cuda_graph_must_be_a_bool_not_a_number():
    """1 == True and 0.0 == False: `in (True, False)` would take a number for the bool it is not."""
    model = tiny()
    idx = torch.randint(0, VOCAB, (1, 4))
    for bad in (1, 0, 1.0):
        with pytest.raises(UserError, match=f"cuda_graph must be a bool, got {bad!r}"):
            gen.generate(model, idx, 2, cuda_graph=bad)


def test_generate_refuses_a_model_it_cannot_graph_before_its_first_token(monkeypatch):
    """A LongRoPE or mixture-of-experts model with cuda_graph: refused before the prefill, not after it once the
    first token went out (on_token: a streamed text, a server's first delta) and the decode step's capture refused
    it. (The capture is emulated: the device is no reason here.)"""
    monkeypatch.setattr(gen, "capture_cuda_graph", fx_capture)
    longrope = tiny(position_encoding="rope", rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 12})
    moe = tiny(position_encoding="rope", norm="rmsnorm", mlp="swiglu", n_experts=4, experts_per_token=2)
    for model, said in ((longrope, "does not take LongRoPE models"), (moe, "does not take mixture-of-experts")):
        streamed = []
        with pytest.raises(UserError, match=said):
            gen.generate(model, torch.randint(0, VOCAB, (1, 4)), 3, cuda_graph=True, on_token=streamed.append)
        assert streamed == []


def test_the_generate_command_refuses_cuda_graphs_off_cuda_before_any_text(saved, capsys):
    """As chat and serve: on a CPU --cuda-graphs is refused at startup, naming the flag; not accepted when no decode
    step follows the prompt's token (--max-new-tokens 1), nor after --stream printed that token."""
    from tritongpt import cli

    base = ["generate", "--weights", str(saved), "--prompt", "The cat", "--device", "cpu", "--temperature", "0",
            "--cuda-graphs"]
    for extra in (["--max-new-tokens", "1"], ["--max-new-tokens", "4", "--stream"]):
        assert cli.main([*base, *extra]) == 2
        out, err = capsys.readouterr()
        assert "--cuda-graphs needs the model on a CUDA device; it is on cpu" in err and out == "", extra


def test_a_device_forward_that_fails_before_its_blocks_leaves_no_positions_behind(monkeypatch):
    """cache.current (the forward's positions, at the fill it was made at) is cleared whatever fails in the forward,
    the embeddings too: kept, the next device step of the same width would reuse the stale positions."""
    model = tiny()
    idx = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        host, dev = model.new_cache(1, 8), model.new_cache(1, 8)
        model(idx[:, :4], host)
        model(idx[:, :4], dev)
        real = model.tok_emb.forward
        monkeypatch.setattr(model.tok_emb, "forward", lambda ids: 1 / 0)
        dev.fill.fill_(dev.pos)
        dev.on_device = True
        with pytest.raises(ZeroDivisionError):
            model(idx[:, 4:5], dev)
        assert dev.current is None
        monkeypatch.setattr(model.tok_emb, "forward", real)
        dev.on_device = False
        host.crop(3)  # a step at another fill (3) than the failed one's (4)
        dev.crop(3)
        want = model(idx[:, 3:4], host)
        dev.fill.fill_(dev.pos)
        dev.on_device = True
        got = model(idx[:, 3:4], dev)
        assert (got - want).abs().max().item() < 1e-5


LLAMA = dict(position_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_weights=False)
FAMILIES = {  # each a family's tiny config (tests/audit_formats.py's EXPORT_BASES), where the step differs
    "gpt-neo": dict(scale_attention=False, qkv_bias=False, attention_window=4, window_layers="odd"),
    "gemma2": dict(LLAMA, mlp="geglu", scale_embeddings=True, tie_weights=True, post_norms=True, attn_softcap=50.0,
                   logit_softcap=3.0, attention_window=4, window_layers="0"),
    "gemma3": dict(LLAMA, mlp="geglu", scale_embeddings=True, tie_weights=True, post_norms=True, qk_norm=True,
                   attention_window=4, window_layers="0", rope_local_theta=100.0),
    "olmo2": dict(LLAMA, pre_norms=False, post_norms=True, qk_norm=True, qk_norm_width="all"),
    "cohere2": dict(LLAMA, norm="layernorm", norm_bias=False, parallel_residual=True, shared_norm=True,
                    logit_scale=0.125, attention_window=4, window_layers="0", nope_layers="1"),
    "command-r+": dict(LLAMA, norm="layernorm", norm_bias=False, parallel_residual=True, shared_norm=True,
                       qk_norm=True, qk_norm_width="each"),
    "phi": dict(position_encoding="rope", rotary_dim=4, parallel_residual=True, shared_norm=True, head_bias=True,
                tie_weights=False),
    "bloom": dict(position_encoding="alibi", embed_norm=True),
    "granite": dict(LLAMA, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.1,
                    logit_scale=0.25),
    "yarn": dict(LLAMA, rope_scaling=dict(rope_type="yarn", factor=2.0, beta_fast=32.0, beta_slow=1.0,
                                          attention_factor=1.1, original_max_position_embeddings=8)),
    "padded-vocab": dict(vocab_multiple=64),
    "lora": dict(LLAMA),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_familys_graph_draws_its_eager_tokens(monkeypatch, family):
    """The step of each family (its windows, softcaps, norms, multipliers, RoPE variants, heads), recorded once and
    replayed, past the context (a 10-position model: the graph until the window slides). Greedy only: a family
    differs in the step the graph records, and sampling draws from its logits outside the graph, in decode_step,
    as for every model (the sampled graph path is test_generate_with_an_emulated_cuda_graph_draws_the_eager_tokens's);
    each step's logits, checked below, are stricter than sampled tokens."""
    from tritongpt.model.lora import add_lora

    monkeypatch.setattr(gen, "capture_cuda_graph", warm_then_fx)
    model = tiny(context_length=10, **FAMILIES[family])
    with torch.no_grad():  # sharper attention than the init's: the tokens then follow the positions (RoPE's too)
        for name, p in model.named_parameters():
            if "W_query" in name or "W_key" in name:
                p.mul_(8)
    if family == "lora":
        add_lora(model, 4)
        with torch.no_grad():  # (B starts at zero: a LoRA update that adds nothing would show nothing)
            for name, p in model.named_parameters():
                if "lora" in name.lower():
                    p.normal_(0, 0.3)
    idx = torch.randint(0, VOCAB, (2, 4))
    want = gen.generate(model, idx, 9)
    assert torch.equal(gen.generate(model, idx, 9, cuda_graph=True), want), family
    with torch.no_grad():  # and each step's logits, which a position baked in moves even where no token changes
        host, dev = model.new_cache(2, 10), model.new_cache(2, 10)
        model(idx, host)
        model(idx, dev)
        graph = gen.DecodeGraph(model, dev, warm_then_fx)
        for t in range(4, 10):
            tok = want[:, t:t + 1]
            assert (graph(tok) - gen.last_logits(model, tok, host)).abs().max().item() < 1e-5, (family, t)


def test_a_graph_of_a_model_on_another_gpu_is_warmed_and_captured_on_that_gpu(monkeypatch):
    """A model on cuda:1 while cuda:0 is current (generate --device cuda:1): the warm-up's side stream waits for
    cuda:1's work (the prefill's keys, the fill), and the capture runs on a stream of cuda:1 with cuda:1 current.
    torch.cuda.graph's own default stream is one stream for the process, made on whichever device was current first:
    a capture there records none of cuda:1's kernels, and each replay would return the logits of the capture.
    No second GPU here: torch.cuda's streams, device guard and graph are stand-ins that record where each runs."""
    import contextlib
    import types

    state = types.SimpleNamespace(device=0, stream=None, seen=[])

    class Stream:
        def __init__(self, device=None):
            self.device = state.device if device is None else torch.device(device).index
            self.waited = []

        def wait_stream(self, other):
            self.waited.append(other.device)

    @contextlib.contextmanager
    def use(value, attr):
        old = getattr(state, attr)
        setattr(state, attr, value)
        try:
            yield
        finally:
            setattr(state, attr, old)

    default_capture_stream = Stream(0)  # torch's: made once, on the device current then

    def graph(g, pool=None, stream=None, **kw):
        return use(stream or default_capture_stream, "stream")

    fake = types.SimpleNamespace(
        Stream=Stream, current_stream=lambda device=None: Stream(device), stream=lambda s: use(s, "stream"),
        device=lambda d: use(torch.device(d).index, "device"), graph=graph,
        CUDAGraph=lambda: types.SimpleNamespace(replay=lambda: None))
    monkeypatch.setattr(gen.torch, "cuda", fake)

    def step():
        state.seen.append((state.device, state.stream.device, state.stream.waited[:]))
    gen.capture_cuda_graph(step, torch.device("cuda", 1))
    assert [s[:2] for s in state.seen] == [(1, 1)] * 3  # two warm-up runs and the capture: cuda:1 current, its stream
    assert state.seen[0][2] == [1]  # the warm-up waited for cuda:1's stream, not cuda:0's
