"""Weight-only int8 quantization (model/quant.py: quantize_weight, Int8Linear, quantize_int8) on both paths: the
reference dequantizes and calls F.linear, the Triton path runs kernels/quant.py's int8_linear (the kernel's own
parity tests: tests/test_int8_linear.py)."""
import pytest
import torch
import torch.nn as nn

import tritongpt.train.generate as gen
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.layers import GELU
from tritongpt.model.quant import Int8Linear, linear_bytes, quantize_int8, quantize_weight
from test_decode_graph import FAMILIES, assert_cached_and_graph_greedy_match_uncached

VOCAB = 97
LLAMA = dict(position_encoding="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False)


def tiny(kernels="reference", **extra):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**dict(vocab_size=VOCAB, context_length=24, n_layer=2, n_head=4, n_embd=64), **extra},
                    kernels=kernels)
    return GPTModel(cfg).eval()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# -- the quantizer ---------------------------------------------------------------------------------------------

def test_each_weight_is_within_half_a_step_of_its_row_and_each_rows_largest_is_127():
    torch.manual_seed(1)
    w = torch.randn(6, 37) * torch.tensor([1e-3, 0.02, 1.0, 50.0, 0.0, 1.0])[:, None]
    w[5, 3] = 40.0  # an outlier: its row's step is coarse, the other rows' are not
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (6,)
    assert int(q.abs().max()) <= 127 and int(q.min()) >= -127
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6)).all())
    nonzero = [0, 1, 2, 3, 5]
    assert q[nonzero].abs().amax(1).tolist() == [127] * 5
    assert q[4].abs().max() == 0 and s[4] == 1.0  # a row of zeros: q 0, any scale (1)
    assert torch.allclose(s[nonzero], w[nonzero].abs().amax(1) / 127)


@pytest.mark.parametrize("w,said", [
    (torch.tensor([[1.0, float("nan")]]), "NaN or inf"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or inf"),
    (torch.ones(4), "floating [out, in] weight, got (4,)"),
    (torch.ones(2, 2, dtype=torch.int32), "torch.int32"),
])
def test_the_quantizer_refuses_what_it_cannot_quantize(w, said):
    with pytest.raises(UserError, match=None) as e:
        quantize_weight(w)
    assert said in str(e.value)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_f_linear_on_the_dequantized_weight_then_its_gelu(bias, kernels):
    """Either path against float64 on the dequantized weight, with each GELU form after it (x scaled up: the tanh
    form and the exact one differ by ~1e-3 there, so a path that took one for the other would show)."""
    import math

    torch.manual_seed(2)
    lin = nn.Linear(50, 30, bias=bias)
    q8 = Int8Linear.from_linear(lin)
    q8.use_triton = kernels == "triton"
    x = 3 * torch.randn(3, 5, 50)
    w = q8.qweight.double() * q8.scale.double()[:, None]
    want = x.double() @ w.T + (lin.bias.double() if bias else 0)
    exact = 0.5 * want * (1 + torch.erf(want / math.sqrt(2)))
    tanh = 0.5 * want * (1 + torch.tanh(math.sqrt(2 / math.pi) * (want + 0.044715 * want ** 3)))
    assert rel(tanh, exact) > 1e-4
    with torch.no_grad():
        got = q8(x)
        got_exact, got_tanh = q8(x, act=GELU("none")), q8(x, act=GELU("tanh"))
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5
    assert rel(got_exact, exact) < 1e-5 and rel(got_tanh, tanh) < 1e-5
    assert 0 < rel(got, lin(x).detach()) < 0.02  # the quantization moved it, a little


# -- a quantized model -----------------------------------------------------------------------------------------

def test_quantize_int8_swaps_every_matrix_and_the_head_for_a_quarter_of_the_bytes():
    model = tiny().train()  # (tiny() is in eval mode: the check below would pass without quantize_int8's eval())
    before = linear_bytes(model)
    quantize_int8(model)
    blocks = [m for b in model.trf_blocks for m in b.modules()]
    assert not any(isinstance(m, nn.Linear) for m in blocks)
    assert sum(isinstance(m, Int8Linear) for m in blocks) == 2 * 6  # q, k, v, out, fc1, fc2 a layer
    assert isinstance(model.out_head, Int8Linear) and model.quantized_linears == 13
    assert model.tok_emb.weight.dtype == torch.float32  # the embedding stays a float table
    C, V = 64, model.config.padded_vocab_size
    weights = 2 * (4 * C * C + 8 * C * C) + V * C  # the int8 bytes
    rows = 2 * (4 * C + 4 * C + C) + V  # one fp32 scale and (but the head) one fp32 bias a row
    assert linear_bytes(model) == weights + 4 * rows + 4 * (rows - V)
    assert before == 4 * weights + 4 * (rows - V)
    assert not model.training


@pytest.mark.parametrize("extra", [dict(), LLAMA, dict(tie_weights=False, head_bias=True, gelu_approximate="none")])
def test_a_quantized_model_stays_near_the_float_one(extra):
    model = tiny(**extra)
    idx = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        want = model(idx)
        got = quantize_int8(model)(idx)
    assert 1e-5 < rel(got, want) < 0.05, rel(got, want)


CASES = {"gpt2": dict(), "llama": LLAMA, "neox-head-bias": dict(tie_weights=False, head_bias=True,
                                                                 gelu_approximate="none"),
         "gemma": FAMILIES["gemma2"], "relu2": dict(mlp="relu2")}


@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_of_a_quantized_model_give_the_same_logits_and_loss(case):
    """The Triton path's int8 matmuls (kernels/quant.py; FeedForward's GELU in fc1's epilogue) against the
    reference's dequantized F.linear, fp32: logits, and the loss through the Triton loss on the int8 head's logits."""
    model = quantize_int8(tiny(**CASES[case]))
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want, want_loss = model(idx), model(idx, targets=idx)
        model.set_kernels("triton")
        assert all(m.use_triton for m in model.modules() if isinstance(m, Int8Linear))
        got, got_loss = model(idx), model(idx, targets=idx)
    assert rel(got, want) < 1e-4, rel(got, want)
    assert abs(got_loss.item() - want_loss.item()) < 1e-4 * want_loss.item()


@pytest.mark.parametrize("approximate", ["tanh", "none", "relu2"])
def test_the_triton_path_runs_fc1s_gelu_in_its_epilogue(monkeypatch, approximate):
    """FeedForward's GELU (or squared ReLU: mlp "relu2") goes to fc1's int8_linear (its epilogue), in its own form;
    no other matmul takes one (run after the matmul in torch instead, the logits would be the same: only this shows
    the fusion)."""
    import tritongpt.kernels.quant as kq

    kind = dict(mlp="relu2") if approximate == "relu2" else dict(gelu_approximate=approximate)
    model = quantize_int8(tiny("triton", **kind))
    seen = []
    real = kq.int8_linear
    monkeypatch.setattr(kq, "int8_linear", lambda x, q, s, b=None, act=None: seen.append(act) or real(x, q, s, b, act))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 3)))
    gelu = {"tanh": "gelu_tanh", "none": "gelu_erf"}.get(approximate, approximate)
    assert seen == [None] * 4 + [gelu, None] + [None] * 4 + [gelu, None] + [None]  # q, k, v, out, fc1, fc2; head


def test_the_int8_matmuls_follow_the_mlp_kernels_name():
    model = tiny("triton")
    quantize_int8(model)  # after set_kernels: the current choice
    assert all(m.use_triton for m in model.modules() if isinstance(m, Int8Linear))
    model.set_kernels("layernorm,attention")
    assert not any(m.use_triton for m in model.modules() if isinstance(m, Int8Linear))
    model.set_kernels("mlp")
    assert all(m.use_triton for m in model.modules() if isinstance(m, Int8Linear))


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_greedy_decoding_of_a_quantized_model_is_the_same_with_and_without_the_cache_and_a_graph(monkeypatch,
                                                                                                 kernels):
    model = quantize_int8(tiny(kernels, n_layer=1))  # (one layer: the interpreter's time)
    idx = torch.randint(0, VOCAB, (2, 4))
    assert_cached_and_graph_greedy_match_uncached(monkeypatch, model, idx, f"the {kernels} path")


def test_a_quantized_model_passes_gradients_through_and_refuses_padding_and_a_second_quantization():
    """Backward through the frozen int8 matrices (QLoRA's path) reaches the float parameters, the embeddings' gradient
    the float model's of the dequantized weights; the int8 tensors are buffers and get none."""
    from tritongpt.model.quant import dequantize_model

    model = quantize_int8(tiny(tie_weights=False))  # (dequantize_model ties a quantized tied head to the embedding)
    twin = dequantize_model(__import__("copy").deepcopy(model))
    idx = torch.randint(0, VOCAB, (1, 5))
    for m in (model, twin):
        m(idx, targets=idx).backward()
    assert rel(model.tok_emb.weight.grad, twin.tok_emb.weight.grad) < 1e-5
    assert not any(b.requires_grad for b in model.buffers())
    with pytest.raises(UserError, match=r"already quantized \(int8\)"):
        quantize_int8(model)
    with pytest.raises(UserError, match="quantized, for inference"):
        model.pad_vocab(64)


def test_quantize_int8_refuses_moe_and_unmerged_lora():
    from tritongpt.model.lora import add_lora, merge_lora

    with pytest.raises(UserError, match="mixture-of-experts"):
        quantize_int8(tiny(**LLAMA, n_experts=4, experts_per_token=2))
    model = add_lora(tiny(), 4)
    with pytest.raises(UserError, match="merge them first"):
        quantize_int8(model)
    assert isinstance(quantize_int8(merge_lora(model)).out_head, Int8Linear)


def test_lora_on_a_quantized_model_is_refused_before_it_changes_anything():
    """The other order (QLoRA's): add_lora looked for the Linears' weights and met an Int8Linear (AttributeError)
    after it had written the LoRA fields into the config and frozen every parameter."""
    from tritongpt.model.lora import add_lora

    model = quantize_int8(tiny())
    with pytest.raises(UserError, match=r"int8-quantized.*LoRA"):
        add_lora(model, 4)
    assert model.config.lora_rank == 0 and all(p.requires_grad for p in model.parameters())


def test_a_quantized_model_moves_whole_and_keeps_its_own_head():
    model = quantize_int8(tiny())
    idx = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        want = model(idx)
        model.to("cpu")  # GPTModel._apply re-ties a float head: an int8 head is its own
        assert isinstance(model.out_head, Int8Linear) and torch.equal(model(idx), want)
        # a dtype move: the float tensors follow it (as a float model's would), the int8 weights stay int8
        model.to(torch.bfloat16)
        assert model.out_head.qweight.dtype == torch.int8 and model.tok_emb.weight.dtype == torch.bfloat16
        ref = model(idx)
        model.set_kernels("triton")
        got = model(idx)
    assert ref.dtype == got.dtype == torch.bfloat16
    assert rel(ref, want) < 2e-2 and rel(got, want) < 2e-2 and rel(got, ref) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_dtype_move_keeps_the_scales_the_fp32_they_were_made_in(dtype):
    """model.half(): the biases and the rest follow, the scales stay fp32 (a small layer's, ~1e-5, would be an fp16
    subnormal of a few bits), and the reference's output is the fp32 scales' (the qweight * scale product made in
    fp32, then cast) whichever way the model was cast."""
    model = tiny()
    with torch.no_grad():
        model.trf_blocks[0].ff.fc2.weight.mul_(1e-2)  # its largest weight ~1e-3: a step ~1e-5
    quantize_int8(model)
    scales = {n: m.scale.clone() for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert scales["trf_blocks.0.ff.fc2"].max() < 6e-5  # below fp16's smallest normal
    model.to(dtype)
    for n, m in model.named_modules():
        if isinstance(m, Int8Linear):
            assert m.scale.dtype == torch.float32 and torch.equal(m.scale, scales[n]), n
            assert m.bias is None or m.bias.dtype == dtype
    fc2 = model.trf_blocks[0].ff.fc2
    x = torch.randn(3, fc2.in_features).to(dtype)
    with torch.no_grad():
        want = (x.double() @ (fc2.qweight.double() * scales["trf_blocks.0.ff.fc2"].double()[:, None]).T
                + fc2.bias.double())
        assert rel(fc2(x), want) < 1e-2


@pytest.mark.cuda
def test_a_quantized_gpt2_small_layer_on_cuda_gives_the_references_logits_under_bf16_autocast():
    """GPT-2 small's widths (768, 3072, the 50257-row head) in bf16 on a GPU: the Triton path's int8 matmuls against
    the reference's dequantized F.linear under the same autocast, and greedy decoding through a real CUDA graph."""
    from tritongpt.model.config import get_config

    torch.manual_seed(0)
    torch.manual_seed(0)
    cfg = GPTConfig(**{**get_config("gpt2-small").to_dict(), "n_layer": 2})
    model = quantize_int8(GPTModel(cfg).eval(), device="cuda")  # (--quantize's order: the int8 matrices made there,
    assert model.out_head.qweight.is_cuda and not model.tok_emb.weight.is_cuda  # then the rest of the model moved)
    model.cuda()
    idx = torch.randint(0, cfg.vocab_size, (2, 100), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        want = model(idx).float()
        model.set_kernels("triton")
        got = model(idx).float()
        assert rel(got, want) < 1e-2, rel(got, want)
        eager = gen.generate(model, idx[:, :20], 30)
        assert torch.equal(gen.generate(model, idx[:, :20], 30, cuda_graph=True), eager)


# -- the commands ----------------------------------------------------------------------------------------------

def test_generate_quantize_int8_says_what_it_saved_and_draws_the_quantized_models_text(saved, capsys, monkeypatch):
    import tritongpt.commands as commands
    from tritongpt import cli

    base = ["generate", "--weights", str(saved), "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "6",
            "--temperature", "0"]
    models = []
    real = commands.quantize
    monkeypatch.setattr(commands, "quantize", lambda model, *a: models.append(model) or real(model, *a))
    assert cli.main([*base, "--quantize", "int8"]) == 0
    out = capsys.readouterr()
    assert "int8 weight-only: 7 matrices" in out.err and "MiB ->" in out.err
    (model,) = models
    assert model.quantized == "int8"
    assert cli.main(base) == 0
    assert "int8 weight-only" not in capsys.readouterr().err


def test_eval_quantize_int8_scores_the_quantized_model(saved, capsys):
    import json

    from tritongpt import cli

    base = ["eval", "--weights", str(saved), "--device", "cpu", "--max-tokens", "200", "--json", "--split", "all"]
    assert cli.main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--quantize", "int8"]) == 0
    quant = json.loads(capsys.readouterr().out)
    assert plain["quantize"] is None and quant["quantize"] == "int8"
    assert quant["tokens"] == plain["tokens"] and quant["loss"] != plain["loss"]
    assert abs(quant["loss"] - plain["loss"]) < 0.05 * plain["loss"]


@pytest.mark.parametrize("command", ["generate", "eval", "lambada"])
def test_the_commands_quantize_before_the_float_weights_move_to_the_device(saved, tmp_path, capsys, monkeypatch,
                                                                             command):
    """--quantize is for a model whose matrices fit the device as int8: the fp32 ones must not go there first (an
    8B model's 32 GB on a 24 GB GPU), only one at a time, while it is quantized. The move of the model (to --device)
    finds it quantized already, its int8 weights made on the device."""
    from tritongpt import cli

    moves = []
    real = GPTModel.to

    def to(self, *args, **kwargs):
        moves.append((getattr(self, "quantized", None), self.out_head.qweight.device.type
                      if isinstance(self.out_head, Int8Linear) else None))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GPTModel, "to", to)
    data = tmp_path / "lambada.jsonl"
    data.write_text('{"text": "the cat sat on the mat"}\n')
    args = {"generate": ["generate", "--prompt", "The cat", "--max-new-tokens", "2", "--temperature", "0"],
            "eval": ["eval", "--max-tokens", "50", "--split", "all", "--json"],
            "lambada": ["lambada", "--data", str(data), "--json"]}[command]  # (hellaswag's loader too)
    assert cli.main([*args, "--weights", str(saved), "--device", "cpu", "--quantize", "int8"]) == 0
    capsys.readouterr()
    assert moves[-1] == ("int8", "cpu"), moves  # (GPTModel.load's own move to the CPU comes first)


def test_eval_quantize_refuses_a_reward_model(saved, tmp_path, capsys):
    """A reward model is scored on preference pairs (its pairwise accuracy), not quantized: refused by name before
    anything is loaded or scored."""
    from tritongpt import cli
    from tritongpt.train.reward import RewardModel

    path = tmp_path / "reward.safetensors"
    RewardModel(GPTModel.load(saved)).save(path)
    assert cli.main(["eval", "--weights", str(path), "--device", "cpu", "--quantize", "int8"]) != 0
    assert "--quantize quantizes a language model for its perplexity; a reward model is scored as it is" in \
        capsys.readouterr().err
    # --group-size (int4's) is as much a language model's: refused too, not dropped without a word
    for argv in (["--group-size", "32"], ["--quantize", "int4", "--group-size", "32"]):
        assert cli.main(["eval", "--weights", str(path), "--device", "cpu", *argv]) != 0
        assert "a reward model is scored as it is" in capsys.readouterr().err


def test_a_draft_is_quantized_with_the_model_and_greedy_text_stays_the_models(saved, capsys):
    """generate --draft D --quantize int8: the draft quantized too (gpt-fast quantizes both); speculative greedy
    decoding then prints the int8 model's own greedy text."""
    from tritongpt import cli

    base = ["generate", "--weights", str(saved), "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "8",
            "--temperature", "0", "--quantize", "int8"]
    assert cli.main(base) == 0
    want = capsys.readouterr().out
    assert cli.main([*base, "--draft", str(saved)]) == 0
    out = capsys.readouterr()
    assert out.out == want
    assert "int8 weight-only: 7 matrices" in out.err and "int8 weight-only (the draft): 7 matrices" in out.err


# -- int8 files (`tritongpt quantize`) -------------------------------------------------------------------------

@pytest.mark.parametrize("head", [True, False])
def test_an_int8_file_loads_as_it_was_saved_without_making_the_float_matrices(tmp_path, monkeypatch, head):
    """save() of a quantized model writes its int8 matrices and fp32 scales; GPTModel.load(quantized_ok=True) builds
    the Int8Linears on the meta device and fills them from the file (GPTModel.empty, which allocates every float
    matrix, is never called): the same logits bit for bit, on both paths."""
    model = quantize_int8(tiny(tie_weights=True), head=head)
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = model(idx)
    model.save(tmp_path / "q.safetensors")
    monkeypatch.setattr(GPTModel, "empty", classmethod(lambda cls, cfg: pytest.fail("the float model was made")))
    inits, init = [], GPTModel._init_weights  # (GPTModel.__init__ initialises each Linear: on meta, nothing made)
    monkeypatch.setattr(GPTModel, "_init_weights", staticmethod(
        lambda m: (inits.append(m.weight.is_meta) if isinstance(m, nn.Linear) else None, init(m))))
    got = GPTModel.load(tmp_path / "q.safetensors", quantized_ok=True)
    assert inits and all(inits)  # every float matrix the model is built with is a meta tensor, never allocated
    assert got.quantized == "int8" and got.quantized_head is head and got.quantized_linears == 12 + head
    assert isinstance(got.out_head, Int8Linear) is head and not got.training
    if not head:  # a float head stays tied to the embedding
        assert got.out_head.weight is got.tok_emb.weight
    want_state, got_state = model.state_dict(), got.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for name, a in want_state.items():
        assert a.dtype == got_state[name].dtype and torch.equal(a, got_state[name]), name
    with torch.no_grad():
        assert torch.equal(got(idx), want)
        got.set_kernels("triton")
        assert rel(got(idx), want) < 1e-4


def test_only_the_commands_that_run_a_model_load_an_int8_file(tmp_path):
    path = tmp_path / "q.safetensors"
    quantize_int8(tiny()).save(path)
    with pytest.raises(UserError, match=r"is int8-quantized \(`tritongpt quantize`\), for inference: generate, chat"):
        GPTModel.load(path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(tmp_path / "q4.safetensors"), {**meta, "quantized": "int4"})
    with pytest.raises(UserError, match="quantized 'int4' .* is not a quantization this version reads"):
        GPTModel.load(tmp_path / "q4.safetensors", quantized_ok=True)


def test_the_quantize_command_writes_a_folder_the_commands_run_as_the_quantize_flag_would(saved, tmp_path, capsys):
    """`tritongpt quantize MODEL --out DIR`: generate and eval on DIR give what --quantize int8 on MODEL gives (the
    file's matrices are those quantize_int8 makes); info names it; trainers and export refuse it by name; the
    command refuses a run folder, an --out in use, an int8 model."""
    import json

    from tritongpt import cli

    out = tmp_path / "int8"
    assert cli.main(["quantize", str(saved), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith("quantize: int8, 7 matrices, ") and str(out / "model.safetensors") in said
    assert (out / "model.safetensors").stat().st_size < saved.stat().st_size
    gen_args = ["generate", "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "8", "--temperature", "0"]
    assert cli.main([*gen_args, "--weights", str(saved), "--quantize", "int8"]) == 0
    want = capsys.readouterr().out
    assert cli.main([*gen_args, "--weights", str(out)]) == 0
    assert capsys.readouterr().out == want
    scores = []
    for args in (["--weights", str(saved), "--quantize", "int8"], ["--weights", str(out)]):
        assert cli.main(["eval", *args, "--device", "cpu", "--max-tokens", "200", "--split", "all", "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["loss"] == scores[1]["loss"] and scores[1]["quantize"] == "int8"
    assert cli.main(["info", "--weights", str(out)]) == 0
    assert "quantized    int8: 7 matrices" in capsys.readouterr().out
    for argv in (["export", str(out), "--out", str(tmp_path / "hf")],
                 ["sft", "--init", str(out), "--max-steps", "1", "--out-dir", str(tmp_path / "sft")]):
        assert cli.main(argv) == 2
        assert "is int8-quantized (`tritongpt quantize`), for inference" in capsys.readouterr().err
    for argv, err in ((["quantize", str(out), "--out", str(tmp_path / "again")], "is int8-quantized already"),
                      (["quantize", str(saved), "--out", str(out)], "already holds a model.safetensors"),
                      (["quantize", str(saved), "--out", str(saved.parent), "--overwrite"],
                       "is the model quantized")):  # (never its own source, --overwrite or not)
        assert cli.main(argv) == 2
        assert err in capsys.readouterr().err, argv
    assert cli.main(["quantize", str(saved), "--out", str(out), "--overwrite", "--no-head"]) == 0
    assert "6 matrices" in capsys.readouterr().out


def test_the_quantize_command_carries_the_tokenizer_and_prompt_format_and_its_folder_runs_as_the_model(saved, tmp_path,
                                                                                                     capsys):
    """The int8 folder keeps what the model was run with: the tokenizer saved beside it and the prompt format it was
    tuned on (chat --template auto, serve); --quantize int8 on it has nothing to do; it runs as a --draft and in
    lambada (whose JSON says int8); a run folder is refused as --out."""
    import json
    import shutil

    from tritongpt import cli
    from tritongpt.train.chat import run_template
    from tritongpt.train.tokenizer import default_tokenizer, load_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    GPTModel.load(saved).save(src / "model.safetensors", {"prompt_format": "alpaca"})
    tok = default_tokenizer()
    tok.save(src / "tokenizer.json")
    out = tmp_path / "int8"
    assert cli.main(["quantize", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    assert run_template(out) == "alpaca"
    assert load_tokenizer(out / "tokenizer.json").hash == tok.hash
    gen_args = ["generate", "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "6", "--temperature", "0"]
    assert cli.main([*gen_args, "--weights", str(out)]) == 0
    want = capsys.readouterr().out
    assert cli.main([*gen_args, "--weights", str(out), "--quantize", "int8"]) == 0
    got = capsys.readouterr()
    assert got.out == want and "is int8 already (saved so): --quantize has nothing to do" in got.err
    assert cli.main([*gen_args, "--weights", str(src)]) == 0
    plain = capsys.readouterr().out
    assert cli.main([*gen_args, "--weights", str(src), "--draft", str(out)]) == 0
    got = capsys.readouterr()
    assert got.out == plain and "speculative decoding" in got.err  # greedy: the model's own text, whatever the draft
    data = tmp_path / "lambada.jsonl"
    data.write_text('{"text": "the cat sat on the mat"}\n')
    assert cli.main(["lambada", "--weights", str(out), "--data", str(data), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantize"] == "int8"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    shutil.copy(src / "tokenizer.json", run / "tokenizer.json")
    assert cli.main(["quantize", str(src), "--out", str(run)]) == 2
    assert "is a tritongpt run or checkpoint folder (metrics.jsonl)" in capsys.readouterr().err
    assert not (run / "model.safetensors").exists()


@pytest.mark.parametrize("key,dtype", [("qweight", torch.uint8), ("qweight", torch.float32), ("scale", torch.bfloat16)])
def test_an_int8_file_whose_matrices_are_not_int8_with_fp32_scales_is_refused_by_name(tmp_path, key, dtype):
    """load_state_dict casts whatever the file holds into the int8 and fp32 buffers: a uint8 matrix (another tool's
    layout) would wrap 128..255 to negatives, a bf16 scale keep 8 bits. A damaged or foreign file, refused by name."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "q.safetensors"
    quantize_int8(tiny()).save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = f"trf_blocks.1.ff.fc2.{key}"
    tensors[name] = tensors[name].abs().to(dtype) if dtype == torch.uint8 else tensors[name].to(dtype)
    save_file(tensors, str(tmp_path / "bad.safetensors"), meta)
    said = "int8" if key == "qweight" else "fp32"
    with pytest.raises(UserError, match=rf"bad.safetensors: tensor {name} is \w+, not {said} \(a damaged int8 file"):
        GPTModel.load(tmp_path / "bad.safetensors", quantized_ok=True)


@pytest.mark.parametrize("value", [0.0, -0.01])
def test_an_int8_file_with_a_scale_of_zero_or_below_is_refused_by_name(tmp_path, value):
    """quantize_weight makes every scale positive (a zero row gets 1): a 0 (a zeroed row) or a negative one (a
    sign-flipped row) is a damaged file, refused by name rather than loaded as another model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "q.safetensors"
    quantize_int8(tiny()).save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = "trf_blocks.0.att.W_key.scale"
    tensors[name][3] = value
    save_file(tensors, str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(UserError, match=r"bad.safetensors: tensor trf_blocks.0.att.W_key.scale holds a scale of 0 or "
                                        r"below"):
        GPTModel.load(tmp_path / "bad.safetensors", quantized_ok=True)
    assert GPTModel.load(path, quantized_ok=True).quantized == "int8"  # the file as saved loads


@pytest.mark.parametrize("head", [True, False])
def test_info_on_an_int8_file_counts_every_tensor_and_says_the_head_is_int8(saved, tmp_path, capsys, head):
    """info's parameters (the float ones) and its int8 line together are the float model's parameters, each once: the
    Int8Linears' biases too (buffers, like their matrices); a quantized head is an int8 copy of the tied embedding,
    not tied (--no-head: the embedding, tied)."""
    import re

    from tritongpt import cli

    out = tmp_path / "int8"
    assert cli.main(["quantize", str(saved), "--out", str(out), *([] if head else ["--no-head"])]) == 0
    capsys.readouterr()
    assert cli.main(["info", "--weights", str(out)]) == 0
    said = capsys.readouterr().out
    params = re.search(r"^parameters   ([\d,]+) \(\S+, (\w+) LM head\)", said, re.M)
    q = re.search(r"^quantized    int8: \d+ matrices \(([\d,]+) weights and ([\d,]+) biases, the parameters above "
                  r"without them\)", said, re.M)
    assert params and q, said
    n, weights, biases = (int(s.replace(",", "")) for s in (params[1], q[1], q[2]))
    model = GPTModel.load(saved)
    copy = model.out_head.weight.numel() if head else 0  # the head's int8 copy of the embedding
    assert n + weights + biases == model.num_params() + copy
    assert params[2] == ("int8" if head else "tied")


def test_eval_of_a_pretraining_runs_int8_folder_scores_the_runs_held_out_tail_as_quantize_int8_does(tmp_path, capsys):
    """eval --weights RUN scores the run's own data, its held-out tail (the record in its state.pt); the int8 folder
    `tritongpt quantize RUN` writes has no state.pt, so it carries that record: eval of it scores the same tokens as
    eval --weights RUN --quantize int8, not the default corpus."""
    import json

    from tritongpt import cli

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat number {i} sat on the mat by dog {i * 7}."}) + "\n"
                            for i in range(120)))
    run, out, cache = tmp_path / "run", tmp_path / "int8", tmp_path / "cache"
    assert cli.main(["pretrain", "--data", str(data), "--out-dir", str(run), "--device", "cpu", "--kernels",
                     "reference", "--block-size", "16", "--batch-size", "2", "--max-steps", "1", "--eval-every", "0",
                     "--sample-tokens", "0", "--cache-dir", str(cache)]) == 0
    assert cli.main(["quantize", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    scores = []
    for args in ([str(run), "--quantize", "int8"], [str(out)]):
        assert cli.main(["eval", "--weights", *args, "--device", "cpu", "--json", "--cache-dir", str(cache)]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["data"] == str(data)
    assert [(s["data"], s["tokens"], s["loss"]) for s in scores[1:]] == [(str(data), scores[0]["tokens"],
                                                                           scores[0]["loss"])]
