"""Shared numerical-parity helpers: every comparison reports max abs error and relative error."""
import torch


def report(out: torch.Tensor, ref: torch.Tensor):
    """Return (max_abs_err, ||out-ref|| / ||ref||), computed in float64."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    diff = out64 - ref64
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel = (diff.norm() / ref64.norm().clamp_min(1e-30)).item()
    return max_abs, rel


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rel_tol: float, name: str = "tensor"):
    """Fail on shape mismatch, any NaN/inf, or relative error above rel_tol; print the figures."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: output has NaN/inf"
    assert torch.isfinite(ref).all(), f"{name}: reference has NaN/inf"
    max_abs, rel = report(out, ref)
    print(f"{name}: max_abs={max_abs:.3e} rel={rel:.3e} (tol {rel_tol:.0e})")
    assert rel <= rel_tol, f"{name}: relative error {rel:.3e} > {rel_tol:.0e} (max abs {max_abs:.3e})"
    return max_abs, rel


def assert_close_mixed(out: torch.Tensor, ref: torch.Tensor, rel_tol: float, abs_floor: float, name: str = "tensor"):
    """||out-ref|| <= rel_tol * ||ref|| + abs_floor, for results that can cancel to near zero.

    abs_floor is the rounding the computation cannot avoid in its working precision (e.g. a
    few fp32 epsilons per entry): a loss of 3e-4 computed from logits near 10, or p - 1 for a
    probability p near 1, is off by ~1e-7 in any fp32 implementation, which is a large relative
    error of a small number. NaN/inf never pass.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: output has NaN/inf"
    assert torch.isfinite(ref).all(), f"{name}: reference has NaN/inf"
    max_abs, rel = report(out, ref)
    err = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
    bound = rel_tol * ref.detach().double().norm().item() + abs_floor
    print(f"{name}: max_abs={max_abs:.3e} rel={rel:.3e} error={err:.3e} (bound {bound:.3e})")
    assert err <= bound, f"{name}: error {err:.3e} > {rel_tol:.0e} * ||ref|| + {abs_floor:.1e} (rel {rel:.3e})"
    return max_abs, rel


def record_step_grads(monkeypatch) -> list:
    """Each Trainer step's gradients as its optimizer gets them (unscaled, before clipping: at its
    torch.nn.utils.clip_grad_norm_ call), a list [(parameter, gradient)] a step. Adam's step is nearly blind to a
    gradient's scale, so a test of two paths' steps compares these, not only the losses or weights."""
    steps, clip = [], torch.nn.utils.clip_grad_norm_

    def clip_recording(params, max_norm):
        params = list(params)
        steps.append([(p, p.grad.clone()) for p in params if p.grad is not None])
        return clip(params, max_norm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_recording)
    return steps


def assert_paths_grads_float64s(grads: dict, want, rel_tol: float, what: str = "first step's"):
    """Each path's gradients ({path: {name: gradient}}) against a float64 model's after its backward (want), tensor by
    tensor. W_key.bias's are 0 exactly on every path: a shift q.b shared by a query's scores leaves its softmax."""
    for name, p in want.named_parameters():
        for path, got in grads.items():
            if name.endswith("W_key.bias"):
                assert got[name].abs().max() < 1e-6, (path, got[name].abs().max())
            else:
                assert_close_rel(got[name], p.grad, rel_tol, f"{path} {what} {name}.grad")


def decode_token_by_token(model, idx, prefill: int = 6, singles: int | None = None, whole: bool = True):
    """(logits of idx run at once (None with whole False), logits of a prefill of `prefill` tokens, then
    `singles` tokens one at a time over the KV cache (None: every other token) and the rest as one chunk
    over it, the cache), under no_grad: the two must agree."""
    T = idx.shape[1]
    stop = T if singles is None else min(T, prefill + singles)
    with torch.no_grad():
        at_once = model(idx) if whole else None
        cache = model.new_cache(idx.shape[0])
        steps = [model(idx[:, :prefill], cache)] + [model(idx[:, t:t + 1], cache) for t in range(prefill, stop)]
        if stop < T:  # a chunk after the single tokens: Tq > 1 over a filled cache
            steps.append(model(idx[:, stop:], cache))
    return at_once, torch.cat(steps, 1), cache


def decodes_like(model, idx, want, singles: int = 1):
    """A float64 model's decode over the KV cache (decode_token_by_token) gives want's logits on the
    reference path (2e-6 relative, token by token) and, in fp32, on the Triton path (1e-5, Tq < Tk in the
    kernel: `singles` single tokens then a chunk, each launch costing the interpreter time); the model is left
    float64 on the reference path."""
    for kernels, dtype, tol, singles in (("reference", torch.float64, 2e-6, None),
                                         ("triton", torch.float32, 1e-5, singles)):
        model.to(dtype).set_kernels(kernels)
        _, decoded, _ = decode_token_by_token(model, idx, singles=singles, whole=False)
        assert_close_rel(decoded.double(), want, tol, f"decoded over the cache, {kernels}")
    model.double().set_kernels("reference")


def greedy_steps(model, prompt, steps: int, **kw):
    """generate()'s greedy decode (kw: generate's settings): (the tokens [B, T + steps], each step's logits as it drew
    from them [B, steps, V], as log-probabilities less their mean: -log Z would hide a logit's error)."""
    from tritongpt.train.generate import generate

    lps = []  # each step's log-probabilities of the whole vocabulary [B, V]
    out = generate(model, prompt, steps, logprobs=model.config.vocab_size, **kw,
                   on_token=lambda nxt, lp: lps.append(torch.empty_like(lp[2]).scatter_(1, lp[1], lp[2])))
    lp = torch.stack(lps, 1)
    return out, lp - lp.mean(-1, keepdim=True)


def greedy_on_both_paths(model, prompt, steps: int, tol: float = 1e-5):
    """generate()'s greedy decode over the KV cache draws the same tokens on the reference and Triton paths, and each
    step's logits on each path (greedy_steps) are a float64 forward's over the drawn text (fp32 `tol` relative). The
    tokens alone are blind: a tiny model drew them with its decode steps' attention off by 3%, or never reading the
    step's own key. The model is left on the reference path. -> the tokens [B, T + steps]."""
    import copy

    drawn = {kernels: greedy_steps(model.set_kernels(kernels), prompt, steps) for kernels in ("reference", "triton")}
    model.set_kernels("reference")
    want = drawn["reference"][0]
    assert torch.equal(drawn["triton"][0], want), "the paths drew different tokens"
    with torch.no_grad():
        exact = torch.log_softmax(copy.deepcopy(model).double()(want[:, :-1]), -1)[:, prompt.shape[1] - 1:]
    for kernels, (_, logits) in drawn.items():
        assert_close_rel(logits, exact - exact.mean(-1, keepdim=True), tol, f"{kernels} path's decode logits")
    return want


def loud_attention(model, gain=20.0):
    """The model's attention outputs scaled up: a tiny model at GPT-2's init draws its next token from the last
    token's embedding almost alone, so tokens read from wrong (or zeroed) keys and values would still match."""
    with torch.no_grad():
        for block in model.trf_blocks:
            block.att.W_value.weight.mul_(gain)
            block.att.out_proj.weight.mul_(gain)
    return model


def pretrain_argv(corpus, out, *extra):
    """`tritongpt pretrain` on conftest's small corpus, quiet and tiny (block 32, batch 4), into out."""
    return ["pretrain", "--data", str(corpus.text), "--tokenizer", str(corpus.tok), "--cache-dir", str(corpus.cache),
            "--out-dir", str(out), "--device", "cpu", "--kernels", "reference", "--block-size", "32", "--batch-size",
            "4", "--sample-tokens", "0", "--log-every", "0", "--eval-every", "0", *extra]


def save_run(tmp_path, model, name="run"):
    """A run folder holding model and a small BPE (280 tokens) trained on a toy text: what export,
    generate and --init read. -> (folder, tokenizer)."""
    from tritongpt.train.tokenizer import BPETokenizer, save_run_tokenizer

    run = tmp_path / name
    tok = BPETokenizer.train(" ".join(f"a cat {i} sat on mat {i * 7}." for i in range(200)), 280, name="tiny")
    save_run_tokenizer(tok, run)
    model.save(run / "model.safetensors")
    return run, tok


def scoring_run(tmp_path, tok, seed: int, context_length: int):
    """A run folder with a seeded random 2-layer GPT of tok's vocabulary and tok saved beside it (what hellaswag
    and lambada read from --weights). -> (folder, model)."""
    from tritongpt.model.config import GPTConfig
    from tritongpt.model.gpt import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=tok.vocab_size, context_length=context_length, n_embd=32, n_layer=2,
                               n_head=2))
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.safetensors")
    tok.save(run / "tokenizer.json")
    return run, model


def logits_match_transformers(hf, model, vocab_size: int, T: int):
    """A float64 model's logits are transformers' (hf, float64) within 2e-6 relative on the
    reference path (transformers computes RMSNorm in fp32 whatever the weights' dtype, and RoPE's
    inverse frequencies as 1 / base^(2i/D) in fp32, ours base^(-2i/D) rounded once: their last bits
    differ), and within 1e-5 on the Triton path in fp32; the model is left float64 on the reference."""
    idx = torch.randint(0, vocab_size, (2, T))
    with torch.no_grad():
        want = hf(idx).logits
        assert_close_rel(model(idx), want, 2e-6, "reference path")
        model.float().set_kernels("triton")
        assert_close_rel(model(idx).double(), want, 1e-5, "triton path")
        model.double().set_kernels("reference")


def hf_llama(folder, vocab_size, tie=False, bias=False, kv_heads=2, eos=0, context=40, kind="llama", **config):
    """A tiny random LlamaForCausalLM (kind "mistral", "qwen2", "qwen3", "smollm3": MistralForCausalLM,
    Qwen2ForCausalLM, Qwen3ForCausalLM, SmolLM3ForCausalLM; float64, heads of 16 unless head_dim says) saved to folder,
    EOS and BOS id eos.
    -> (the model, its model.safetensors)."""
    import transformers

    torch.manual_seed(0)
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "smollm3": "SmolLM3"}[kind]
    if kind in ("llama", "smollm3"):
        config = dict(attention_bias=bias, mlp_bias=bias, **config)
    if kind == "smollm3":  # its default pad id (128004) is past a tiny vocabulary
        config.setdefault("pad_token_id", 0)
    cfg = getattr(transformers, prefix + "Config")(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=88, num_hidden_layers=config.pop("layers", 2),
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=context, rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        rope_parameters=config.pop("rope_parameters", {"rope_type": "default", "rope_theta": 5000.0}),
        bos_token_id=eos, eos_token_id=eos, **config)
    hf = getattr(transformers, prefix + "ForCausalLM")(cfg).double().eval()
    with torch.no_grad():  # random init has unit norms and zero biases: make every tensor count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(folder)
    return hf, folder / "model.safetensors"


def a_head_of_its_own_is_kept(path, embed: str, vocab_size: int, T: int) -> dict:
    """Writes a head unlike the embedding (state dict key embed) into the tied safetensors file at path, beside
    tie_word_embeddings true: transformers 5 keeps the file's head (the premise, checked), and load_checkpoint must
    read the same logits. Returns the file's state dict, the head in it."""
    import transformers
    from safetensors.torch import load_file, save_file

    from tritongpt.train.gpt2_weights import load_checkpoint

    sd = load_file(path)
    assert "lm_head.weight" not in sd  # (saved tied)
    sd["lm_head.weight"] = torch.randn_like(sd[embed])
    save_file(sd, path, metadata={"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float64).eval()
    assert torch.equal(hf.lm_head.weight, sd["lm_head.weight"])  # (the premise: transformers keeps it)
    model = load_checkpoint(path).double().eval()
    assert not model.config.tie_weights
    idx = torch.randint(0, vocab_size, (2, T))
    with torch.no_grad():
        assert_close_rel(model(idx), hf(idx).logits, 2e-6, "a head of its own")
    return sd


def rope_reads(monkeypatch, path, *modules) -> int:
    """How many times load_checkpoint(path) reads the config's RoPE object (llama_weights.read_rope_parameters, as
    each of modules imports it)."""
    from tritongpt.train import llama_weights
    from tritongpt.train.gpt2_weights import load_checkpoint

    calls, read = [], llama_weights.read_rope_parameters

    def spy(d, cfg_json):
        calls.append(cfg_json)
        return read(d, cfg_json)

    for module in (*modules, llama_weights):
        monkeypatch.setattr(module, "read_rope_parameters", spy)
    load_checkpoint(path)
    return len(calls)
