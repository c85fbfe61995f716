"""Serving several LoRA adapters at once (model/lora.py serve_adapters, AdapterLinear; train/engine.py's adapter
rows): each row of a batch runs its own adapter, or none, unmerged beside the shared base weights."""
import copy
import json

import pytest
import torch

from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.lora import AdapterLinear, add_adapter, serve_adapters
from tritongpt.train import serve
from tritongpt.train.engine import Engine
from tritongpt.train.generate import generate

from parity import assert_close_rel
from test_engine import SAMPLED, graphed, prompt, run, seeded

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
GPT2 = dict()
LLAMA = dict(position_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False)
# each adapter leaves some matrices alone, and the two adapt different ones (an adapter's zero slot elsewhere)
PATHS = {"gpt2": (["0.att.W_query", "0.att.W_value", "1.ff.fc1", "1.att.out_proj"],
                  ["0.att.W_key", "1.att.W_value", "0.ff.fc2"]),
         "llama": (["0.att.W_query", "0.ff.w_gate", "1.ff.w_down"], ["0.att.W_value", "1.ff.w_up", "0.att.W_key"])}


def tiny(kernels="reference", **extra):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, context_length=40, n_embd=32, n_layer=2, n_head=2, tie_weights=False,
                    kernels=kernels, **extra)
    return GPTModel(cfg).eval()


def adapter(model, paths, rank, seed, size=0.3):
    """{module path: (A [r, in], scaled B [out, r])}, random (B not zero: an adapter that changes the model)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in paths:
        m = model.get_submodule(f"trf_blocks.{p}")
        out[f"trf_blocks.{p}"] = (torch.randn(rank, m.in_features, generator=g) * size,
                                  torch.randn(m.out_features, rank, generator=g) * size)
    return out


def served(model, family="gpt2", ranks=(4, 7)):
    """A copy of model serving adapters "a" and "b" (ranks 4 and 7: b's pads a's); -> (served, adapters)."""
    adapters = {name: adapter(model, paths, r, seed) for name, paths, r, seed in
                zip("ab", PATHS[family], ranks, (1, 2))}
    model = copy.deepcopy(model)
    serve_adapters(model, adapters)
    return model, adapters


def merged64(model, modules):
    """The base in float64 with the adapter merged into its weights, W + B A: the reference."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for path, (a, b) in modules.items():
            m.get_submodule(path).weight += b.double() @ a.double()
    return m


@pytest.mark.parametrize("family,kernels", [("gpt2", "reference"), ("llama", "reference"), ("gpt2", "triton"),
                                            ("llama", "triton")])
def test_each_row_runs_its_adapter_as_the_merged_model_does_in_float64(family, kernels, monkeypatch):
    """Rows of adapters a, b, none and b in one forward: each row's logits the float64 merged model's for its
    adapter (non-power-of-two ranks 4 and 7 padded to 7; each adapter leaves other matrices alone); then one
    adapter for every row (generate()'s int index). The Triton path: kernels/lora.py's add_lora_rows in every
    adapted matrix (the MLP unfused there), the reference's float64 merged model the same."""
    base = tiny(**(LLAMA if family == "llama" else GPT2))
    model, adapters = served(base, family)
    model.set_kernels(kernels)
    import tritongpt.kernels.lora as lora_kernels

    calls = []
    kernel = lora_kernels.add_lora_rows
    monkeypatch.setattr(lora_kernels, "add_lora_rows", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    assert sum(isinstance(m, AdapterLinear) for m in model.modules()) == 7 - (family == "llama")
    x = torch.randint(0, VOCAB, (4, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.adapters.use(torch.tensor([0, 1, -1, 1])):
        out = model(x)
    with torch.no_grad():
        refs = [merged64(base, adapters["a"]), merged64(base, adapters["b"]), base.double()]
        for row, which in enumerate((0, 1, 2, 1)):
            ref = refs[which](x[row:row + 1])[0]
            assert (out[row].double() - base(x[row:row + 1])[0].double()).abs().max() > 1e-2 or which == 2
            assert_close_rel(out[row], ref, 1e-4, f"row {row}")
        with model.adapters.use(1):
            assert_close_rel(model(x), refs[1](x), 1e-4, "every row b")
        assert_close_rel(model(x), refs[2](x), 1e-4, "no adapter: the base")
    assert len(calls) == (7 - (family == "llama") if kernels == "triton" else 0)  # (a row index: the kernel)


def alone(model, idx, new, kw):
    """generate() of one request alone, its adapter (kw's "adapter") for every row."""
    kw = dict(kw)
    name = kw.pop("adapter", None)
    with model.adapters.use(-1 if name is None else model.adapters.slot(name)):
        return generate(model, idx, new, **seeded(kw))


def check(model, schedule, engine):
    out = run(engine, schedule)
    for (handle, _), (_, idx, new, kw) in zip(out, schedule):
        assert torch.equal(handle.wait(), alone(model, idx, new, kw))
    assert engine.free == list(range(engine.max_batch)) and not engine.running and not engine.waiting
    return [at for _, at in out]


@pytest.mark.parametrize("cache", ["slots", "pages", "graphs"])
def test_requests_of_several_adapters_batch_as_each_alone(cache):
    """Requests of adapters a and b and of the base in one batch (a decode step's rows, a prefill's right-padded
    group, n = 2 rows, greedy and seeded samples): each one's tokens generate()'s alone with its adapter. Slot and
    paged caches, and CUDA-graph replays (emulated): the graph reads the engine's adapter buffer as each step sets
    it. The adapters change the tokens (else the test could not tell a row given the wrong one)."""
    base = tiny()
    model, _ = served(base)
    p = prompt(9, seed=1)
    schedule = [(0, p, 8, {"adapter": "a"}), (0, p, 8, {}), (0, prompt(5, 2, seed=2), 6, dict(SAMPLED, seed=3,
                                                                                               adapter="b")),
                (2, p, 7, {"adapter": "b"}), (3, prompt(6, seed=4), 5, {"adapter": "a"})]
    log = []
    engine = graphed(model, log) if cache == "graphs" else Engine(model, max_batch=4, kv_pages=None if cache ==
                                                                  "slots" else 32, page_size=4)
    # (the emulated capture costs ~1 s a bucket: one bucket there, 2 rows, whose slot 1 runs the base's request,
    # then b's: the graph replays its adapter buffer as it is at each step)
    ran = [(0, p, 5, {"adapter": "a"}), (0, prompt(5, seed=2), 2, {}), (3, p, 3, {"adapter": "b"})] \
        if cache == "graphs" else schedule
    check(model, ran, engine)
    texts = {kw.get("adapter"): alone(model, idx, new, kw)[0, 9:] for _, idx, new, kw in schedule[:2] + schedule[3:4]}
    assert not torch.equal(texts["a"], texts[None]) and not torch.equal(texts["b"][:7], texts[None][:7])
    assert not torch.equal(texts["a"][:7], texts["b"][:7])  # (nor a row given the other adapter)
    assert engine.stats["lora_requests"] == sum("adapter" in kw for *_, kw in ran)
    assert cache != "graphs" or log.count("capture") == 2 and log[:2] == ["capture", 2] and log[-1] == 2


@pytest.mark.cuda
@pytest.mark.parametrize("kernels,pages", [("reference", None), ("triton", 16)])
def test_requests_of_several_adapters_on_cuda_with_real_graphs(kernels, pages):
    """A real capture a bucket (fp32, greedy): rows of adapters a, b and the base replayed as the engine's adapter
    buffer changes under the graph; the Triton path's add_lora_rows (kernels/lora.py) in the captured step."""
    model, _ = served(tiny(kernels).cuda())
    engine = Engine(model, max_batch=4, cuda_graph=True, kv_pages=pages, page_size=4)
    p = prompt(9, seed=1).cuda()
    schedule = [(0, p, 8, {"adapter": "a"}), (0, p, 8, {}), (1, prompt(5, seed=2).cuda(), 6, {"adapter": "b"}),
                (5, prompt(6, seed=4).cuda(), 3, {"adapter": "a"})]
    check(model, schedule, engine)
    assert engine.graphs


def test_the_triton_path_batches_adapters_as_generate_does():
    """add_lora_rows in the engine's forwards (a right-padded prefill group, decode steps of mixed rows) against
    generate() alone on the same Triton model."""
    model, _ = served(tiny("triton"))
    schedule = [(0, prompt(6, seed=1), 3, {"adapter": "a"}), (0, prompt(4, seed=2), 3, {}),
                (1, prompt(5, seed=3), 2, {"adapter": "b"})]
    check(model, schedule, Engine(model, max_batch=3))


def test_prefix_caching_shares_a_prompts_pages_only_between_requests_of_one_adapter():
    """Adapter a's request ends and caches its prompt's pages; the same prompt under b (whose keys and values
    differ: b adapts layer 0's W_key) reads none of them, and gets its own tokens; a's second request reads them
    back; the base's reads none."""
    base = tiny()
    model, _ = served(base)
    engine = Engine(model, max_batch=2, kv_pages=32, page_size=4, prefix_caching=True)
    p = prompt(13, seed=5)
    cached = []
    for name in ("a", "b", "a", None):
        kw = {} if name is None else {"adapter": name}
        check(model, [(0, p, 4, kw)], engine)
        cached.append(engine.stats["cached_prompt_tokens"])
    assert cached == [0, 0, 12, 12]


def test_max_loras_passes_over_a_request_of_another_adapter():
    """max_loras 1: a's request runs; b's waits though rows are free, the base's request behind it is admitted
    (vLLM's scheduler passes b over); b runs once a's has ended, and a's second request, behind b, after b's.
    Each gets its tokens alone."""
    model, _ = served(tiny())
    schedule = [(0, prompt(5, seed=1), 6, {"adapter": "a"}), (0, prompt(4, seed=2), 3, {"adapter": "b"}),
                (0, prompt(6, seed=3), 3, {}), (1, prompt(3, seed=4), 2, {"adapter": "a"})]
    assert check(model, schedule, Engine(model, max_batch=4, max_loras=1)) == [0, 6, 0, 9]
    assert check(model, schedule, Engine(model, max_batch=4)) == [0, 0, 0, 1]


def test_what_serving_adapters_refuses():
    base = tiny()
    modules = adapter(base, ["0.att.W_query"], 4, 1)
    for adapters, match in [
            ({"a": adapter(base, ["0.att.W_query"], 17, 1)}, r"rank 17, above the largest served \(16"),
            ({"a": {"trf_blocks.0.att.nothing": modules["trf_blocks.0.att.W_query"]}}, "has no module"),
            ({"a": {"trf_blocks.0.att": modules["trf_blocks.0.att.W_query"]}}, "is a MultiHeadAttention, not a"),
            ({"a": {"trf_blocks.0.ff.fc1": modules["trf_blocks.0.att.W_query"]}}, r"A \(4, 32\) and B \(32, 4\) do "
                                                                                 r"not fit its \[128, 32\] weight")]:
        with pytest.raises(UserError, match=match):
            serve_adapters(copy.deepcopy(base), adapters)
    model, _ = served(base)
    with pytest.raises(UserError, match="serves adapters already"):
        serve_adapters(model, {"c": modules})
    with pytest.raises(UserError, match=r"no LoRA adapter 'c': its adapters are 'a', 'b'"):
        Engine(model, max_batch=2).submit(prompt(3), 2, adapter="c")
    with pytest.raises(UserError, match="it serves no adapter"):
        Engine(base, max_batch=2).submit(prompt(3), 2, adapter="a")
    with pytest.raises(UserError, match="max_loras must be a positive integer, and only for a model serving adapters"):
        Engine(base, max_batch=2, max_loras=1)
    with pytest.raises(UserError, match="max_loras must be a positive integer"):
        Engine(model, max_batch=2, max_loras=0)


def test_a_qlora_checkpoints_adapter_served_on_its_int4_base_is_the_qlora_model(tmp_path):
    """QLoRA's update runs before fc1's GELU: an int4 base (fc1 a QuantLinear applying the GELU itself) serving
    its own QLoRA checkpoint's adapter (read_adapter) gives the QLoRA model's logits; the base alone does not."""
    from tritongpt.model.lora import strip_lora
    from tritongpt.model.quant import quantize
    from tritongpt.train.gpt2_weights import read_adapter

    from test_lora import small, with_trained_lora

    model = with_trained_lora(quantize(small(seed=5), "int4", head=False, group_size=32), rank=2, alpha=7.0).eval()
    base = strip_lora(copy.deepcopy(model))
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, alone_base = model(x), base(x)
    model.save(tmp_path / "model.safetensors")
    serve_adapters(base, {"q": read_adapter(tmp_path / "model.safetensors", base)})
    with torch.no_grad(), base.adapters.use(torch.tensor([0, -1])):
        out = base(x)
    assert_close_rel(out[0], want[0], 1e-5, "the adapter's row")
    assert_close_rel(out[1], alone_base[1], 1e-5, "the base's row")
    assert (want - alone_base).abs().max() > 1e-2


# -- serve --enable-lora --lora-modules ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """A served run folder, and two adapters of its model: a LoRA checkpoint of ours and a peft folder."""
    from test_lora import with_trained_lora
    from test_serve import tiny_run
    from tritongpt.train.gpt2_weights import export_peft_adapter

    tmp = tmp_path_factory.mktemp("lora")
    tok = tiny_run(tmp / "run", "chat")
    adapters = {}
    for name, rank, seed in (("ours", 4, 1), ("peft", 6, 2)):
        model = with_trained_lora(GPTModel.load(tmp / "run" / "ckpt-0000001" / "model.safetensors"), rank, 8.0,
                                  seed=seed)
        for p in model.parameters():  # (B at 0.05 a value: big enough to change a tiny model's greedy text)
            p.data.mul_(4.0) if p.shape[-1] == rank else None
        if name == "ours":
            (tmp / name).mkdir()
            model.save(tmp / name / "model.safetensors")
        else:
            export_peft_adapter(model, tmp / name, str(tmp / "run"))
        adapters[name] = tmp / name
    return tmp / "run", tok, adapters


@pytest.fixture(scope="module", params=["engine", "max-batch-1"])
def lora_server(request, lora_files):
    from test_serve import start

    folder, tok, adapters = lora_files
    flags = ["--max-batch", "1"] if request.param == "max-batch-1" else ["--kv-cache-pages", "64",
                                                                         "--enable-prefix-caching"]
    server = start(folder, "--served-model-name", "base", "--enable-lora", "--lora-modules",
                   f"ours={adapters['ours']}", json.dumps({"name": "peft", "path": str(adapters["peft"])}), *flags)
    server.RequestHandlerClass.log_message = lambda *a: None
    yield server, tok, adapters
    server.shutdown()
    server.server_close()


def test_serve_lists_its_adapters_and_each_request_runs_the_one_it_names(lora_server):
    """/v1/models: the model, then each adapter with its path as root and the model as parent (vLLM's cards). A
    completion naming an adapter is generate()'s text with that adapter (the response names it), streamed alike;
    the three texts differ; an unknown model is a 404 naming the served ones."""
    from test_serve import call, events

    server, tok, adapters = lora_server
    status, body = call(server, "/v1/models")
    assert status == 200 and [(m["id"], m["parent"], m["root"]) for m in body["data"]] == [
        ("base", None, "base"), ("ours", "base", str(adapters["ours"])), ("peft", "base", str(adapters["peft"]))]
    assert call(server, "/v1/models/peft")[1]["parent"] == "base"
    ids = tok.encode("the cat sat")
    texts = {}
    for name in ("base", "ours", "peft", "ours"):  # (ours twice: its prompt's pages cached the first time)
        body = {"model": name, "prompt": "the cat sat", "max_tokens": 12, "temperature": 0}
        status, out = call(server, "/v1/completions", body)
        rows = server.app.model.adapters
        with rows.use(-1 if name == "base" else rows.slot(name)):
            want = generate(server.app.model, torch.tensor([ids]), 12)[0, len(ids):].tolist()
        assert status == 200 and out["model"] == name and out["choices"][0]["text"] == tok.decode(ids + want)[
            len(tok.decode(ids)):], name
        chunks = events(call(server, "/v1/completions", dict(body, stream=True))[1])
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == out["choices"][0]["text"]
        assert {c["model"] for c in chunks} == {name}
        texts[name] = out["choices"][0]["text"]
    assert len(set(texts.values())) == 3, texts
    status, out = call(server, "/v1/completions", {"model": "other", "prompt": "a", "max_tokens": 1})
    assert status == 404 and "'base', 'ours', 'peft'" in out["error"]["message"]
    assert call(server, "/tokenize", {"model": "peft", "prompt": "the cat"})[0] == 200


def test_serve_refuses_bad_lora_flags_by_name(lora_files, tmp_path):
    from test_serve import start

    folder, _, adapters = lora_files
    ours = f"ours={adapters['ours']}"
    for flags, match in [
            (["--lora-modules", ours], "--lora-modules needs --enable-lora"),
            (["--enable-lora"], "pass the adapters too, --lora-modules NAME=PATH"),
            (["--enable-lora", "--lora-modules", "ours"], "give NAME=PATH"),
            (["--enable-lora", "--lora-modules", ours, ours], "names 'ours' twice"),
            (["--enable-lora", "--lora-modules", f"x={tmp_path / 'none'}"], "no adapter at"),
            (["--enable-lora", "--lora-modules", '{"name": "x"}'], "string 'name' and 'path'"),
            (["--enable-lora", "--lora-modules", '{"name": "x", "path": "y", "rank": 4}'], "not 'rank'"),
            (["--enable-lora", "--lora-modules", ours, "--max-lora-rank", "3"], r"rank 4, above the largest served "
                                                                                 r"\(3"),
            (["--enable-lora", "--lora-modules", f"base={adapters['ours']}", "--served-model-name", "base"],
             "that is the model's own name"),
            (["--max-loras", "2"], "--max-loras is a setting of the adapters of --lora-modules"),
            (["--max-lora-rank", "8"], "--max-lora-rank is a setting of the adapters of --lora-modules"),
            (["--enable-lora", "--lora-modules", f"run={folder}"], "has no LoRA")]:
        with pytest.raises(UserError, match=match):
            start(folder, *flags)


def test_the_lm_head_and_a_moe_router_are_refused_as_targets():
    """The engine runs the LM head outside its forward's rows (on each request's rows, after the forward), and a
    MoE router sees the batch's tokens flattened: an adapter there would run the base for every row, or fail deep
    in a bmm. serve_adapters refuses both by name; every attention and MLP projection is served."""
    base = tiny()
    g = torch.Generator().manual_seed(1)
    with pytest.raises(UserError, match="out_head is the LM head"):
        serve_adapters(copy.deepcopy(base), {"h": {"out_head": (torch.randn(3, 32, generator=g),
                                                                torch.randn(VOCAB, 3, generator=g))}})
    moe = tiny(**LLAMA, n_experts=3, experts_per_token=2)
    with pytest.raises(UserError, match="router is a MoE router"):
        serve_adapters(moe, {"r": {"trf_blocks.0.ff.router": (torch.randn(2, 32, generator=g),
                                                              torch.randn(3, 2, generator=g))}})


def test_max_loras_a_passed_over_request_runs_under_a_steady_stream_of_another_adapter():
    """max_loras 1: a's requests arrive every step; b's, passed over at step 1, must still run once a's running ones
    end. (Admitting a's requests behind it, as vLLM's scheduler does, kept a on the batch for as long as they came:
    b waited out the stream.) Each request's tokens are generate()'s alone."""
    model, _ = served(tiny())
    schedule = [(step, prompt(4, seed=step), 3, {"adapter": "a"}) for step in range(10)]
    schedule.insert(2, (1, prompt(5, seed=20), 2, {"adapter": "b"}))
    at = check(model, schedule, Engine(model, max_batch=2, max_loras=1))
    assert at[2] <= 4, at


def test_adapters_through_preemption_chunked_prefill_prefix_hits_and_speculation():
    """Requests of a, b and the base in a pool of 12 pages of 2 (4 preemptions: each recompute must run its
    adapter again), prompts prefilled 5 tokens a step (a chunk's forward its request's adapter), a prompt's pages
    read back by the same adapter's later request, and prompt lookup speculation (the verify forward's rows): each
    request's tokens generate(prompt_lookup=2)'s alone with its adapter; every slot's adapter back to -1."""
    model, _ = served(tiny())
    p = prompt(9, seed=1)
    schedule = [(0, p, 9, {"adapter": "a"}), (0, torch.cat([p, p[:, :4]], 1), 8, {"adapter": "b"}),
                (1, prompt(7, 2, seed=2), 6, {}), (2, p, 7, {"adapter": "a"}),
                (3, prompt(6, seed=3), 5, {"adapter": "b"})]
    engine = Engine(model, max_batch=3, kv_pages=12, page_size=2, prefix_caching=True, max_prefill_tokens=5,
                    prompt_lookup=2, num_draft_tokens=3)
    out = run(engine, schedule)
    for (handle, _), (_, idx, new, kw) in zip(out, schedule):
        assert torch.equal(handle.wait(), alone(model, idx, new, dict(kw, prompt_lookup=2, num_draft_tokens=3))), kw
    assert engine.stats["preemptions"] == 4 and engine.stats["cached_prompt_tokens"] > 0
    assert engine.stats["spec_decode_num_drafts"] > 0 and bool((engine.slot_adapter == -1).all())
    assert engine.free == [0, 1, 2] and not engine.running and not engine.waiting


def test_under_autocast_the_adapters_cast_is_kept_until_an_adapter_changes():
    """serve's bf16 autocast: each AdapterLinear casts its slots once, not each forward (the same tensors come
    back), and a slot loaded again is cast again (the forward then runs its new values)."""
    model, adapters = served(tiny())
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    linear = model.get_submodule("trf_blocks.0.att.W_query")
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), model.adapters.use(torch.tensor([0, 1])):
        first = model(x)
        kept = linear.cast(torch.bfloat16)
        assert model(x).equal(first) and all(t is k for t, k in zip(linear.cast(torch.bfloat16), kept))
        a, b = adapters["a"]["trf_blocks.0.att.W_query"]
        linear.load(0, a, 3 * b)
        again = model(x)
    assert kept[1][0].float().abs().sum() > 0 and not again[0].equal(first[0]) and again[1].equal(first[1])
    assert torch.equal(linear.cast(torch.bfloat16)[1][0, :, :4], (3 * b).to(torch.bfloat16))


def test_runtime_loading_serves_an_adapter_from_its_next_request_and_unloading_ends_it(lora_files, monkeypatch):
    """vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter ($VLLM_ALLOW_RUNTIME_LORA_UPDATING, a
    server started with --enable-lora and no adapter): a loaded adapter answers as the one served from the start
    does (generate() under it), is listed, is refused twice; a second one grows the rank (4 -> 6); unloaded, it is
    a 404 and its slot takes the next load, whose prompt's cached pages are not the unloaded one's (a salt a load).
    Without the variable the paths are 404s and --enable-lora alone is refused."""
    from test_serve import call, start

    folder, tok, adapters = lora_files
    with pytest.raises(UserError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=true"):
        start(folder, "--enable-lora")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    server = start(folder, "--served-model-name", "base", "--enable-lora", "--kv-cache-pages", "64",
                   "--enable-prefix-caching")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        prompt = "the cat sat on the mat. a dog ran in the park, the bird sang; " * 2  # (2 full pages of 16: cached)
        ids = tok.encode(prompt)
        assert len(ids) > 32

        def complete(name):
            status, out = call(server, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 8,
                                                           "temperature": 0})
            return status, out["choices"][0]["text"] if status == 200 else out["error"]["message"]

        def want(name):
            rows = server.app.model.adapters
            with rows.use(rows.slot(name)):
                new = generate(server.app.model, torch.tensor([ids]), 8)[0, len(ids):].tolist()
            return tok.decode(ids + new)[len(tok.decode(ids)):]

        base = complete("base")
        assert complete("ours")[0] == 404
        load = {"lora_name": "ours", "lora_path": str(adapters["ours"])}
        assert call(server, "/v1/load_lora_adapter", load) == (200, "Success: LoRA adapter 'ours' added successfully.")
        assert complete("ours") == (200, want("ours")) and want("ours") != base[1]
        assert [m["id"] for m in call(server, "/v1/models")[1]["data"]] == ["base", "ours"]
        status, out = call(server, "/v1/load_lora_adapter", load)
        assert status == 400 and out["error"]["message"] == "The lora adapter 'ours' has already been loaded."
        assert call(server, "/v1/load_lora_adapter", {"lora_name": "peft", "lora_path": str(adapters["peft"])})[0] \
            == 200
        assert server.app.model.get_submodule("trf_blocks.0.att.W_query").lora_A.shape[:2] == (2, 6)
        assert complete("peft") == (200, want("peft")) and complete("ours") == (200, want("ours"))
        assert call(server, "/v1/unload_lora_adapter", {"lora_name": "ours"}) == (
            200, "Success: LoRA adapter 'ours' removed successfully.")
        assert complete("ours")[0] == 404 and complete("base") == base
        status, out = call(server, "/v1/unload_lora_adapter", {"lora_name": "ours"})
        assert status == 404 and out["error"]["message"] == "The lora adapter 'ours' cannot be found."
        # the peft adapter loaded again as "ours", into the freed slot 0: its own text, not the cached old one's
        again = {"lora_name": "ours", "lora_path": str(adapters["peft"])}
        assert call(server, "/v1/load_lora_adapter", again)[0] == 200 and server.app.model.adapters.slot("ours") == 0
        assert complete("ours") == complete("peft")
        assert server.app.engine.stats["cached_prompt_tokens"] > 0  # (the prompt's pages were read from the cache)
        for body, says in [({"lora_name": "x"}, "'lora_path' must be a non-empty string"),
                           ({"lora_name": "x", "lora_path": "/nowhere"}, "No adapter found at /nowhere"),
                           ({"lora_name": "x", "lora_path": str(folder)}, "has no LoRA"),
                           ({"lora_name": "x", "lora_path": "p", "load_inplace": True}, "'load_inplace' is not")]:
            status, out = call(server, "/v1/load_lora_adapter", body)
            assert status in (400, 404) and says in out["error"]["message"], (body, out)
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    server = start(folder, "--enable-lora", "--lora-modules", f"ours={adapters['ours']}")
    server.RequestHandlerClass.log_message = lambda *a: None
    try:
        assert call(server, "/v1/load_lora_adapter", load)[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_the_engine_unloads_no_adapter_in_use_and_a_load_drops_its_graphs():
    """Engine.unload_adapter refuses an adapter a waiting request uses; unloaded, a request of it is refused and
    its slot takes the next load_adapter, which drops the captured graphs (its buffers may be new ones) and serves
    from the next step: b's weights loaded as c answer as b does."""
    model, adapters = served(tiny())
    engine = Engine(model, max_batch=2)
    waiting = engine.submit(prompt(5, seed=1), 3, adapter="a")
    with pytest.raises(UserError, match="the adapter 'a' runs 1 request"):
        engine.unload_adapter("a")
    while engine.step():
        pass
    waiting.wait()
    engine.unload_adapter("a")
    with pytest.raises(UserError, match="no LoRA adapter 'a'"):
        engine.submit(prompt(5), 2, adapter="a")
    engine.graphs = {1: "a graph over the old buffers"}
    assert engine.load_adapter("c", adapters["b"]) == 0 and engine.graphs == {}
    assert model.adapters.names == ["c", "b"] and model.adapters.salts[0] != model.adapters.salts[1]
    assert check(model, [(0, prompt(6, seed=2), 4, {"adapter": "c"}), (0, prompt(6, seed=2), 4, {"adapter": "b"})],
                 engine) == [0, 0]
    assert torch.equal(alone(model, prompt(6, seed=2), 4, {"adapter": "c"}),
                       alone(model, prompt(6, seed=2), 4, {"adapter": "b"}))


def test_an_unload_right_after_a_cancel_is_not_refused_for_the_cancelled_request():
    """A request cancelled (its client gone: serve's hold on its adapter already let go) still sits in the engine's
    running and waiting lists until the next step drops it; an unload between (Engine.call runs before that step)
    drops it first, as the step would, rather than refuse the adapter as one a request runs. The requests then end
    as cancelled ones do; one not cancelled still refuses it."""
    from tritongpt.train.engine import Cancelled

    model, _ = served(tiny())
    engine = Engine(model, max_batch=1)
    running = engine.submit(prompt(5, seed=1), 4, adapter="a")
    engine.step()
    waiting = engine.submit(prompt(6, seed=2), 3, adapter="a")
    assert engine.running == [running] and list(engine.waiting) == [waiting]
    other = engine.submit(prompt(4, seed=3), 2, adapter="b")
    running.cancel()
    waiting.cancel()
    engine.unload_adapter("a")
    assert model.adapters.names == [None, "b"] and list(engine.waiting) == [other] and not engine.running
    for r in (running, waiting):
        with pytest.raises(Cancelled):
            r.wait()
    with pytest.raises(UserError, match="the adapter 'b' runs 1 request"):
        engine.unload_adapter("b")
    while engine.step():
        pass
    assert other.wait().shape == (1, 6) and engine.free == [0]


def test_with_a_slot_left_free_by_an_unload_each_request_still_runs_its_own_adapter():
    """a unloaded (slot 0 free, b still in slot 1): b's requests run b's slot, not the index among the adapters
    served (which would refuse b as "unloaded", or run the freed slot's zeros); unloading b counts b's requests."""
    model, _ = served(tiny())
    engine = Engine(model, max_batch=2)
    engine.unload_adapter("a")
    assert model.adapters.names == [None, "b"]
    r = engine.submit(prompt(5, seed=1), 3, adapter="b")
    assert r.adapter == 1
    with pytest.raises(UserError, match="the adapter 'b' runs 1 request"):
        engine.unload_adapter("b")
    check(model, [(0, prompt(6, seed=2), 4, {"adapter": "b"}), (0, prompt(6, seed=3), 3, {})], engine)


def test_a_name_reloaded_while_a_request_of_it_is_submitted_never_reads_the_old_loads_cached_pages():
    """The race: submit resolves "a" (its slot, its load's salt), then "a" is unloaded and b's weights loaded as
    "a" into the same slot, then the request is appended (under the engine's cond): it runs the new "a" and its
    prefix-cache salt is the new load's, so it reads none of the pages the old "a" cached for the same prompt (it
    would, keeping the salt it read first, and draw from the old adapter's keys and values)."""
    model, adapters = served(tiny())
    engine = Engine(model, max_batch=2, kv_pages=32, page_size=4, prefix_caching=True)
    p = prompt(13, seed=5)
    check(model, [(0, p, 2, {"adapter": "a"})], engine)  # (a's pages of p cached)
    cached = engine.stats["cached_prompt_tokens"]

    class Racing:  # the engine's cond, the reload run before submit's append takes it
        def __init__(self, cond):
            self.cond, self.reloaded = cond, False

        def __enter__(self):
            if not self.reloaded:
                engine.cond, self.reloaded = self.cond, True
                engine.unload_adapter("a")
                engine.load_adapter("a", adapters["b"])
            return self.cond.__enter__()

        def __exit__(self, *exc):
            return self.cond.__exit__(*exc)
    engine.cond = racing = Racing(engine.cond)
    r = engine.submit(p, 4, adapter="a")
    while engine.step():
        pass
    assert racing.reloaded and model.adapters.slot("a") == 0 and engine.stats["cached_prompt_tokens"] == cached
    assert torch.equal(r.wait(), alone(model, p, 4, {"adapter": "a"}))


def test_loads_and_unloads_from_other_threads_while_a_started_engine_runs_requests():
    """A started engine (paged, prefix caching, chunked prefill) runs requests of a, b, c and the base from three
    client threads while a fourth loads c (rank 9: every buffer grown while a's and b's requests are mid-decode or
    mid-prefill), unloads a (refused while in use: tried again) and loads c and a again with other weights, the
    same prompts each time: every request that was taken ends as generate() alone with the load it was submitted
    under (its salt names it), none hangs, and at the end every cache row is free and runs no adapter."""
    import threading

    model, adapters = served(tiny())
    base = tiny()
    weights = {"a": adapters["a"], "b": adapters["b"], "c1": adapter(base, PATHS["gpt2"][1], 9, 3),
               "c2": adapter(base, PATHS["gpt2"][0][:2], 2, 4), "a2": adapter(base, PATHS["gpt2"][0], 5, 5)}
    engine = Engine(model, max_batch=3, kv_pages=64, page_size=4, prefix_caching=True, max_prefill_tokens=8).start()
    loaded = {model.adapters.salts[0]: ("a", "a"), model.adapters.salts[1]: ("b", "b")}  # a load's salt -> its
    # name and weights
    taken, refused, errors = [], [], []

    def client(names, seed):
        try:
            for i, name in enumerate(names):
                idx = prompt(11, seed=seed * 10 + i % 2)  # (a prompt again: its cached pages, that load's only)
                try:
                    r = engine.submit(idx, 5, adapter=name)
                except UserError as e:
                    assert "no LoRA adapter" in str(e)
                    refused.append(name)
                    continue
                taken.append((r, name, idx, r.wait()))
        except Exception as e:
            errors.append(e)

    def loader():
        try:
            for name, w in (("c", "c1"), ("a", None), ("a", "a2"), ("c", None), ("c", "c2")):
                for _ in range(400):  # (an unload refused while a request of it waits or runs: again)
                    try:
                        if w is None:
                            engine.unload_adapter(name)
                        else:
                            slot = engine.load_adapter(name, weights[w])
                            loaded[model.adapters.salts[slot]] = name, w
                        break
                    except UserError as e:
                        assert "runs" in str(e)
                        time.sleep(0.005)
                else:
                    raise AssertionError(f"{name} never unloaded")
        except Exception as e:
            errors.append(e)

    import time
    threads = [threading.Thread(target=client, args=(names, s)) for s, names in
               enumerate([["a", "b", "a", None, "a"], ["c", "b", "c", "a", "c"], ["b", None, "c", "b", "c"]])]
    threads.append(threading.Thread(target=loader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    alive = [t for t in threads if t.is_alive()]
    engine.close()
    assert not alive and not errors, (alive, errors)
    assert model.adapters.names == ["a", "b", "c"] and len(taken) + len(refused) == 15 and "b" not in refused
    assert engine.free == [0, 1, 2] and (engine.slot_adapter == -1).all()
    for w in ("a", "b", "c1", "c2", "a2"):  # (each load's weights under a name of their own, to check against)
        add_adapter(model, f"={w}", weights[w])
    for r, name, idx, out in taken:
        assert name is None or loaded[r.salt][0] == name  # (a load of the name it asked for)
        w = None if name is None else f"={loaded[r.salt][1]}"
        assert torch.equal(out, alone(model, idx, 5, {"adapter": w})), (name, w)


def test_an_unload_between_listing_the_models_and_writing_their_cards_is_no_error(lora_server):
    """/v1/models lists the adapters loaded at one moment: an unload landing while the list is written (emulated:
    the adapters' dict loses one once its names are read) leaves a list without it, not a 500 (a KeyError)."""
    from test_serve import call

    server, _, adapters = lora_server
    app, paths = server.app, server.app.adapter_paths

    class Unloading(dict):
        def __iter__(self):
            names = list(dict.__iter__(self))
            yield from names
            self.pop("peft", None)  # (Model.unload_adapter's del, on another thread)
    app.adapter_paths = Unloading(paths)
    try:
        status, body = call(server, "/v1/models")
        assert status == 200 and [m["id"] for m in body["data"]] in (["base", "ours", "peft"], ["base", "ours"])
        assert call(server, "/v1/models/peft")[0] in (200, 404)
    finally:
        app.adapter_paths = paths


def test_a_load_between_graphed_steps_recaptures_and_an_unload_keeps_the_graphs():
    """Emulated CUDA graphs (test_engine's graphed): a's and a base request decode in a 2-row graph; then c is
    loaded between steps (rank 9: every buffer grown, so the graph captured over the old ones is dropped) and its
    request joins a's mid-decode: the 2-row graph captured again, both as generate() alone (a graph replayed over
    the old 2-slot buffers would run c's row off their end). Unloading c then moves no buffer: the graphs kept."""
    log = []
    model, _ = served(tiny())
    engine = graphed(model, log)
    p, q = prompt(7, seed=6), prompt(5, seed=7)
    a, plain = engine.submit(p, 9, adapter="a"), engine.submit(q, 2)
    while plain.queue.empty() or plain.slots is not None:
        engine.step()
    assert log == ["capture", 2], log
    slot = engine.load_adapter("c", adapter(tiny(), PATHS["gpt2"][1], 9, 3))
    assert slot == 2 and engine.graphs == {}
    c = engine.submit(q, 4, adapter="c")
    while engine.step():
        pass
    after = log[2:]  # (c's prefill beside a's decode: a 1-row graph, then the 2-row one captured again)
    assert after.count("capture") == 2 and after[after.index(2) - 1] == "capture" and c.slots is None
    assert torch.equal(a.wait(), alone(model, p, 9, {"adapter": "a"}))
    assert torch.equal(c.wait(), alone(model, q, 4, {"adapter": "c"}))
    graphs = dict(engine.graphs)
    engine.unload_adapter("c")
    assert engine.graphs == graphs and graphs


def test_an_unload_between_a_requests_check_and_its_forward_is_refused_and_the_request_runs(lora_server,
                                                                                            monkeypatch):
    """An unload landing after a streamed request's "model" was checked and its headers sent, but before the model
    runs it (the engine's submit, or no engine: its turn at the model), is refused as one while a request of it
    runs (the request holds its adapter: Model.holding), and the stream ends with that adapter's text; it was the
    engine's refusal, a 404 inside a stream already begun. Once the request has ended the unload goes through."""
    from test_serve import call, events

    server, _, adapters = lora_server
    app = server.app
    body = {"model": "peft", "prompt": "the cat", "max_tokens": 3, "temperature": 0, "stream": True}
    want = "".join(c["choices"][0]["text"] for c in events(call(server, "/v1/completions", body)[1]) if c["choices"])
    target = (app.engine, "submit") if app.engine is not None else (app, "generate_alone")
    real, refusals = getattr(*target), []

    def unloaded_first(*args, **kw):
        try:
            app.unload_adapter("peft")
        except UserError as e:
            refusals.append(str(e))
        return real(*args, **kw)
    monkeypatch.setattr(*target, unloaded_first)
    try:
        status, text = call(server, "/v1/completions", body)
        monkeypatch.undo()
        assert refusals == ["the adapter 'peft' runs 1 request(s): unload it once they have ended"]
        assert status == 200 and "".join(c["choices"][0]["text"] for c in events(text) if c["choices"]) == want
        assert {c["model"] for c in events(text)} == {"peft"} and want
        app.unload_adapter("peft")  # (the request has ended: nothing holds it)
        assert "peft" not in app.adapter_paths and "peft" not in app.model.adapters.names
    finally:
        monkeypatch.undo()
        if "peft" not in app.adapter_paths:
            app.load_adapter("peft", str(adapters["peft"]))


def test_a_request_whose_adapter_is_unloaded_before_it_is_held_is_a_404_before_its_stream(lora_server,
                                                                                       monkeypatch):
    """An unload landing between a request's check of its "model" and its hold on it (emulated: right after the
    check, Completion's) is vLLM's 404 for a model not there, with the engine as without it, before the stream's
    headers: not a 200 whose stream then ends in that error."""
    from test_serve import call

    server, _, adapters = lora_server
    app = server.app
    real = serve.Completion.__init__

    def checked_then_unloaded(self, *args, **kw):
        real(self, *args, **kw)
        app.unload_adapter("peft")
    monkeypatch.setattr(serve.Completion, "__init__", checked_then_unloaded)
    try:
        status, out = call(server, "/v1/completions", {"model": "peft", "prompt": "the cat", "max_tokens": 2,
                                                       "stream": True})
    finally:
        monkeypatch.undo()
        app.load_adapter("peft", str(adapters["peft"]))
    assert status == 404 and "'peft'" in out["error"]["message"] and out["error"]["code"] == "model_not_found"

def test_of_two_unloads_of_one_adapter_racing_the_second_is_the_404_of_an_adapter_not_there(lora_server,
                                                                                           monkeypatch):
    """Two POST /v1/unload_lora_adapter of one name at once both pass the endpoint's look-up; the other one's
    unload landing between this one's look-up and its unload (emulated: run first) makes this one vLLM's 404 for an
    adapter not there, with the engine as without it (it was the engine's or the model's refusal as a 400)."""
    from test_serve import call

    server, _, adapters = lora_server
    app = server.app
    real = app.unload_adapter

    def the_other_first(name):
        real(name)
        real(name)
    monkeypatch.setattr(app, "runtime_lora", True)
    monkeypatch.setattr(app, "unload_adapter", the_other_first)
    try:
        status, out = call(server, "/v1/unload_lora_adapter", {"lora_name": "peft"})
    finally:
        monkeypatch.undo()
        if "peft" not in app.adapter_paths:
            app.load_adapter("peft", str(adapters["peft"]))
    assert (status, out["error"]["message"], out["error"]["code"]) == (
        404, "The lora adapter 'peft' cannot be found.", "not_found"), out
    assert "peft" in app.adapter_paths and "peft" in app.model.adapters.names


def test_of_two_loads_of_one_name_racing_the_second_is_vllms_already_loaded(lora_server, monkeypatch):
    """Two POST /v1/load_lora_adapter of one name at once both pass the endpoint's look-up; the other one's load
    landing between this one's look-up and its load (emulated: run first) makes this one vLLM's 400 for a name
    loaded already (it was the engine's or the model's own wording), the first load served."""
    from test_serve import call

    server, _, adapters = lora_server
    app = server.app
    real = app.load_adapter

    def the_other_first(name, path):
        real(name, str(adapters["ours"]))
        real(name, path)
    monkeypatch.setattr(app, "runtime_lora", True)
    monkeypatch.setattr(app, "load_adapter", the_other_first)
    try:
        status, out = call(server, "/v1/load_lora_adapter", {"lora_name": "again", "lora_path": str(adapters["peft"])})
        assert app.adapter_paths.get("again") == str(adapters["ours"]) and "again" in app.model.adapters.names
    finally:
        monkeypatch.undo()
        if "again" in app.adapter_paths:
            app.unload_adapter("again")
    assert (status, out["error"]["message"], out["error"]["param"]) == (
        400, "The lora adapter 'again' has already been loaded.", "lora_name"), out


def test_a_request_whose_adapter_is_unloaded_right_after_its_fields_are_checked_is_a_404_not_the_base(lora_server,
                                                                                                    monkeypatch):
    """An unload landing between the check of a request's fields (its "model" one of those served) and the reading
    of its adapter from that "model" (emulated: right after sampling_settings) is the 404 of an adapter not there;
    it was the base model's answer, named the base's, to a request of the adapter."""
    from test_serve import call

    server, _, adapters = lora_server
    app = server.app
    real = serve.sampling_settings

    def checked_then_unloaded(*args, **kw):
        out = real(*args, **kw)
        app.unload_adapter("peft")
        return out
    monkeypatch.setattr(serve, "sampling_settings", checked_then_unloaded)
    try:
        status, out = call(server, "/v1/completions", {"model": "peft", "prompt": "the cat", "max_tokens": 2})
    finally:
        monkeypatch.undo()
        if "peft" not in app.adapter_paths:
            app.load_adapter("peft", str(adapters["peft"]))
    assert status == 404 and "'peft'" in out["error"]["message"] and out["error"]["code"] == "model_not_found", out
