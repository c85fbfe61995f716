"""Weight-only int4 quantization (model/quant.py: quantize_weight_int4, Int4Linear, quantize_int4) on both paths, its
files and its command-line flags: the reference dequantizes and calls F.linear, the Triton path runs kernels/quant.py's
int4_linear (the kernel's own parity tests: tests/test_int4_linear.py). int8's: tests/test_quantize.py."""
import json

import pytest
import torch
import torch.nn as nn

import tritongpt.train.generate as gen
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.layers import GELU
from tritongpt.model.quant import (Int4Linear, linear_bytes, quantize, quantize_int4,
                                   quantize_int8, quantize_weight_int4, unpack_int4)
from test_decode_graph import assert_cached_and_graph_greedy_match_uncached
from test_quantize import LLAMA, VOCAB, rel, tiny


def dequantized(q, scale, offset, group):
    """The float64 matrix quantize_weight_int4's three tensors stand for, unpacked here by hand (not unpack_int4)."""
    N = q.shape[0]
    low, high = (q & 15).double(), (q >> 4).double()
    levels = torch.empty(N, 2 * q.shape[1], dtype=torch.float64)
    levels[:, 0::2], levels[:, 1::2] = low, high
    return levels * scale.double().repeat_interleave(group, 1) + offset.double().repeat_interleave(group, 1)


# -- the quantizer ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", [16, 32])
def test_each_weight_is_within_half_a_step_of_its_group_and_each_groups_ends_are_levels(group):
    torch.manual_seed(1)
    w = torch.randn(5, 96) * torch.tensor([1e-3, 0.02, 1.0, 50.0, 1.0])[:, None]
    w[4, 3] = 40.0  # an outlier: its group's step is coarse, the row's other groups' are not
    w[2, group:2 * group] = 0.25  # a constant group: exact, scale 1 and q 0
    q, scale, offset = quantize_weight_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (5, 48)
    assert scale.dtype == offset.dtype == torch.float32 and scale.shape == offset.shape == (5, 96 // group)
    levels = unpack_int4(q)
    assert levels.shape == (5, 96) and int(levels.max()) <= 15
    step = scale.repeat_interleave(group, 1)
    back = dequantized(q, scale, offset, group)
    assert bool(((back - w.double()).abs() <= step.double() / 2 * (1 + 1e-6) + 1e-12).all())
    groups = levels.view(5, -1, group)
    varied = w.view(5, -1, group).amax(2) > w.view(5, -1, group).amin(2)
    assert bool((groups.amin(2)[varied] == 0).all()) and bool((groups.amax(2)[varied] == 15).all())
    assert torch.equal(offset, w.view(5, -1, group).amin(2))  # the minimum is level 0, exactly
    assert scale[2, 1] == 1.0 and bool((levels[2, group:2 * group] == 0).all()) and offset[2, 1] == 0.25
    assert w[4, 3] == pytest.approx(float(back[4, 3]))  # the outlier is its group's top level


def test_two_levels_a_byte_the_even_input_in_the_low_nibble():
    """The packing the kernel reads: byte j of a row holds q[2j] in its low four bits and q[2j + 1] in its high."""
    w = torch.arange(16, dtype=torch.float32).repeat(2, 1)  # one group of 16 a row: level k is input k
    w[1] = w[1].flip(0)
    q, scale, offset = quantize_weight_int4(w, 16)
    assert scale.tolist() == [[1.0], [1.0]] and offset.tolist() == [[0.0], [0.0]]
    assert q[0].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert q[1].tolist() == [0xEF, 0xCD, 0xAB, 0x89, 0x67, 0x45, 0x23, 0x01]
    assert unpack_int4(q)[0].tolist() == list(range(16))


@pytest.mark.parametrize("w,group,said", [
    (torch.tensor([[1.0, float("nan")] * 8]), 16, "NaN or inf"),
    (torch.tensor([[1.0, float("inf")] * 8]), 16, "NaN or inf"),
    (torch.ones(16), 16, "floating [out, in] weight, got (16,)"),
    (torch.ones(2, 16, dtype=torch.int32), 16, "torch.int32"),
    (torch.ones(2, 48), 32, "needs in_features a multiple of it, got 48: pass a smaller group size (16 divide it)"),
    (torch.ones(2, 40), 16, "got 40: pass a smaller group size (no int4 group size divides it: use int8)"),
    (torch.ones(2, 64), 24, "group size must be one of 16, 32, 64, 128, 256, 512, 1024, got 24"),
])
def test_the_int4_quantizer_refuses_what_it_cannot_quantize(w, group, said):
    with pytest.raises(UserError) as e:
        quantize_weight_int4(w, group)
    assert said in str(e.value)



def test_a_group_whose_range_overflows_fp32_is_refused_and_one_just_inside_quantizes():
    """max - min of a group of finite weights can pass fp32's largest value (3.4e38): its scale would be inf, every
    level (g - min) / inf NaN cast to 0, and the layer's dequantized weights NaN. Refused by name; a range that fits
    keeps both ends as its levels 0 and 15, finite."""
    w = torch.zeros(2, 32)
    w[0, 16], w[0, 17] = -3e38, 3e38  # row 0's second group: a range of 6e38
    with pytest.raises(UserError, match=r"row 0, group 1: its range .* overflows fp32"):
        quantize_weight_int4(w, 16)
    w[0, 16], w[0, 17] = -1.5e38, 1.5e38  # 3e38: fits
    q, scale, offset = quantize_weight_int4(w, 16)
    back = dequantized(q, scale, offset, 16)
    assert bool(torch.isfinite(back).all()) and bool(torch.isfinite(scale).all())
    assert float(back[0, 16]) == float(w[0, 16]) and float(back[0, 17]) == pytest.approx(float(w[0, 17]), rel=1e-6)
    lin = nn.Linear(16, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-3e38, 3e38] + [0.0] * 14, [0.0] * 16]))
    with pytest.raises(UserError, match="overflows fp32"):  # the layer (and so the model) too, not a NaN layer
        Int4Linear.from_linear(lin, group_size=16)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("bias", [True, False])
def test_int4_linear_is_f_linear_on_the_dequantized_weight_then_its_gelu(bias, kernels):
    torch.manual_seed(2)
    lin = nn.Linear(96, 40, bias=bias)
    q4 = Int4Linear.from_linear(lin, group_size=32)
    q4.use_triton = kernels == "triton"
    x = torch.randn(3, 5, 96)
    w = dequantized(q4.qweight, q4.scale, q4.offset, 32)
    want = x.double() @ w.T + (lin.bias.double() if bias else 0)
    with torch.no_grad():
        assert rel(q4(x), want) < 1e-5
        act = GELU("tanh")
        assert rel(q4(x, act=act), act(want)) < 1e-5
        assert rel(q4(x), lin(x)) < 0.15  # 16 levels a group: a random layer's output within ~10 %
    # a gradient reaches x through the frozen weight (QLoRA's), the GELU then applied outside the kernel
    x.requires_grad_()
    act(q4(x, act=act)).sum().backward()
    xd = x.detach().double().requires_grad_()
    act(act(xd @ w.T + (lin.bias.double() if bias else 0))).sum().backward()
    assert rel(x.grad, xd.grad) < 1e-5 and not any(t.requires_grad for t in q4.buffers())


# -- the model -------------------------------------------------------------------------------------------------

def test_quantize_int4_swaps_every_matrix_and_the_head_for_under_a_fifth_of_the_bytes():
    model = tiny()
    before = linear_bytes(model)
    assert quantize_int4(model, group_size=32) is model and not model.training
    blocks = list(model.trf_blocks.modules())
    assert not any(isinstance(m, nn.Linear) for m in blocks)
    assert sum(isinstance(m, Int4Linear) for m in blocks) == 2 * 6
    assert isinstance(model.out_head, Int4Linear) and model.quantized_linears == 13
    assert (model.quantized, model.quantized_group_size, model.quantized_head) == ("int4", 32, True)
    # 4 bits a weight plus 8 bytes (scale and offset) a group of 32: 6 bits against fp32's 32, the biases aside
    assert linear_bytes(model) < before / 5
    assert model.out_head.qweight.shape == (VOCAB, 32) and model.tok_emb.weight.shape == (VOCAB, 64)
    assert quantize_int8(tiny()).quantized_group_size is None


def test_a_group_size_that_does_not_divide_every_width_is_refused_before_anything_is_swapped():
    model = tiny(n_embd=48, n_head=4)  # 48 and 192: 16 divides both, 32 neither 48
    with pytest.raises(UserError, match=r"trf_blocks.0.att.W_query: int4 quantization with group size 32 needs "
                                        r"in_features a multiple of it, got 48"):
        quantize_int4(model, group_size=32)
    assert not getattr(model, "quantized", None) and not any(isinstance(m, Int4Linear) for m in model.modules())
    assert quantize_int4(model, group_size=16).quantized_group_size == 16
    with pytest.raises(UserError, match="already quantized"):
        quantize(model, "int8")
    with pytest.raises(UserError, match="quantization must be int8 or int4, got 'int2'"):
        quantize(tiny(), "int2")


@pytest.mark.parametrize("extra", [dict(), LLAMA, dict(tie_weights=False, head_bias=True, gelu_approximate="none")])
def test_a_quantized_model_stays_near_the_float_one_and_smaller_groups_nearer(extra):
    model = tiny(**extra)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        want, want_loss = model(idx), model(idx, targets=idx)
        errs = {}
        for group in (16, 64):
            q = quantize_int4(tiny(**extra), group_size=group)
            errs[group] = rel(q(idx), want)
            assert abs(float(q(idx, targets=idx)) - float(want_loss)) < 0.05 * float(want_loss)
    assert errs[16] < errs[64] < 0.2, errs


@pytest.mark.parametrize("case", ["gpt2", "llama", "neox-head-bias", "relu2"])
def test_both_paths_of_an_int4_model_give_the_same_logits_and_loss(case):
    extra = {"gpt2": dict(), "llama": LLAMA,
             "neox-head-bias": dict(tie_weights=False, head_bias=True, gelu_approximate="none"),
             "relu2": dict(mlp="relu2")}[case]
    model = quantize_int4(tiny(**extra), group_size=32)
    idx = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        want, want_loss = model(idx), model(idx, targets=idx)
        model.set_kernels("triton")
        assert all(m.use_triton for m in model.modules() if isinstance(m, Int4Linear))
        got, got_loss = model(idx), model(idx, targets=idx)
        model.set_kernels({"layernorm", "attention"})  # the int4 matmuls follow "mlp", the matmul kernels' name
        assert not any(m.use_triton for m in model.modules() if isinstance(m, Int4Linear))
    assert rel(got, want) < 1e-4 and abs(float(got_loss) - float(want_loss)) < 1e-4


@pytest.mark.parametrize("kind, activation", [(dict(gelu_approximate="none"), "gelu_erf"),
                                              (dict(mlp="relu2"), "relu2")])
def test_the_triton_path_runs_fc1s_gelu_in_the_int4_epilogue(monkeypatch, kind, activation):
    """fc1's GELU, or the squared ReLU (mlp "relu2"), in its int4_linear's epilogue."""
    import tritongpt.kernels.quant as kq

    calls = []
    real = kq.int4_linear
    monkeypatch.setattr(kq, "int4_linear", lambda *a: calls.append(a[5]) or real(*a))
    model = quantize_int4(tiny("triton", **kind), group_size=32)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 4)))
    assert calls.count(activation) == 2 and calls.count(None) == 2 * 5 + 1  # fc1 a layer; q k v out fc2, the head


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_greedy_decoding_of_an_int4_model_is_the_same_with_and_without_the_cache_and_a_graph(monkeypatch, kernels):
    model = quantize_int4(tiny(kernels, n_layer=1), group_size=32)  # (one layer: the interpreter's time)
    idx = torch.randint(0, VOCAB, (2, 5))
    assert_cached_and_graph_greedy_match_uncached(monkeypatch, model, idx, f"the {kernels} path")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_dtype_move_keeps_the_scales_and_offsets_fp32(dtype):
    model = quantize_int4(tiny(), group_size=32)
    kept = {n: (m.scale.clone(), m.offset.clone()) for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    model.to(dtype)
    for n, m in model.named_modules():
        if isinstance(m, Int4Linear):
            assert m.qweight.dtype == torch.uint8 and m.scale.dtype == m.offset.dtype == torch.float32, n
            assert torch.equal(m.scale, kept[n][0]) and torch.equal(m.offset, kept[n][1]), n
            assert m.bias is None or m.bias.dtype == dtype


@pytest.mark.cuda
def test_an_int4_gpt2_small_layer_on_cuda_gives_the_references_logits_under_bf16_autocast():
    """GPT-2 small's widths (768, 3072, the 50257-row head) at group 128 in bf16 on a GPU: the Triton path's int4
    matmuls against the reference's dequantized F.linear under the same autocast, and greedy decoding through a real
    CUDA graph."""
    from tritongpt.model.config import get_config

    torch.manual_seed(0)
    cfg = GPTConfig(**{**get_config("gpt2-small").to_dict(), "n_layer": 2})
    model = quantize_int4(GPTModel(cfg).eval(), device="cuda")
    assert model.out_head.qweight.is_cuda and not model.tok_emb.weight.is_cuda
    model.cuda()
    idx = torch.randint(0, cfg.vocab_size, (2, 100), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        want = model(idx).float()
        model.set_kernels("triton")
        got = model(idx).float()
        assert rel(got, want) < 1e-2, rel(got, want)
        eager = gen.generate(model, idx[:, :20], 30)
        assert torch.equal(gen.generate(model, idx[:, :20], 30, cuda_graph=True), eager)


# -- int4 files ------------------------------------------------------------------------------------------------

def _tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("head", [True, False])
def test_an_int4_file_loads_as_it_was_saved_without_making_the_float_matrices(tmp_path, monkeypatch, head):
    model = quantize_int4(tiny(tie_weights=True), group_size=16, head=head)
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = model(idx)
    model.save(tmp_path / "q.safetensors")
    assert _tensors(tmp_path / "q.safetensors")[1]["quantized_group_size"] == "16"
    monkeypatch.setattr(GPTModel, "empty", classmethod(lambda cls, cfg: pytest.fail("the float model was made")))
    got = GPTModel.load(tmp_path / "q.safetensors", quantized_ok=True)
    assert (got.quantized, got.quantized_group_size, got.quantized_head) == ("int4", 16, head)
    assert isinstance(got.out_head, Int4Linear) is head and not got.training and got.quantized_linears == 12 + head
    want_state, got_state = model.state_dict(), got.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for name, a in want_state.items():
        assert a.dtype == got_state[name].dtype and torch.equal(a, got_state[name]), name
    with torch.no_grad():
        assert torch.equal(got(idx), want)
        got.set_kernels("triton")
        assert rel(got(idx), want) < 1e-4
    with pytest.raises(UserError, match=r"is int4-quantized \(`tritongpt quantize`\), for inference"):
        GPTModel.load(tmp_path / "q.safetensors")


@pytest.mark.parametrize("meta,said", [
    ({"quantized_group_size": None}, "quantized 'int4' (head 'true', group size None) is not a quantization"),
    ({"quantized_group_size": "x16"}, "quantized_group_size 'x16' is not a number"),
    ({"quantized_group_size": "24"}, "its int4 layout does not fit its config (trf_blocks.0.att.W_query: int4 "
                                     "group size must be one of"),
    ({"quantized_group_size": "32"}, "its tensors do not fit its saved model config"),
    # (int8 with a group size is a GPTQ 8-bit folder's group scales, saved: this file's int4 tensors do not fit it)
    ({"quantized": "int8"}, "tensor out_head.qweight is U8, not int8 (a damaged int8 file"),
])
def test_an_int4_files_damaged_metadata_is_refused_by_name(tmp_path, meta, said):
    from safetensors.torch import save_file

    quantize_int4(tiny(), group_size=16).save(tmp_path / "q.safetensors")
    tensors, old = _tensors(tmp_path / "q.safetensors")
    new = {k: v for k, v in {**old, **meta}.items() if v is not None}
    save_file(tensors, str(tmp_path / "bad.safetensors"), new)
    with pytest.raises(UserError) as e:
        GPTModel.load(tmp_path / "bad.safetensors", quantized_ok=True)
    assert "bad.safetensors" in str(e.value) and said in str(e.value)


@pytest.mark.parametrize("key,dtype,said", [("qweight", torch.int8, "uint8"), ("offset", torch.bfloat16, "fp32"),
                                            ("scale", torch.float16, "fp32")])
def test_an_int4_file_whose_tensors_are_stored_otherwise_is_refused_by_name(tmp_path, key, dtype, said):
    """Loading casts into the buffers: int8 bytes would read 128..255 as negatives (the high nibble lost), a 16-bit
    offset or scale would round. A damaged or foreign file, refused by name."""
    from safetensors.torch import save_file

    quantize_int4(tiny(), group_size=16).save(tmp_path / "q.safetensors")
    tensors, meta = _tensors(tmp_path / "q.safetensors")
    name = f"trf_blocks.1.ff.fc2.{key}"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(UserError, match=rf"bad.safetensors: tensor {name} is \w+, not {said} \(a damaged int4 file"):
        GPTModel.load(tmp_path / "bad.safetensors", quantized_ok=True)


def test_an_int4_file_with_a_scale_of_zero_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    quantize_int4(tiny(), group_size=16).save(tmp_path / "q.safetensors")
    tensors, meta = _tensors(tmp_path / "q.safetensors")
    tensors["trf_blocks.0.att.W_key.scale"][3, 1] = 0.0
    save_file(tensors, str(tmp_path / "bad.safetensors"), meta)
    with pytest.raises(UserError, match=r"tensor trf_blocks.0.att.W_key.scale holds a scale of 0 or below \(int4"):
        GPTModel.load(tmp_path / "bad.safetensors", quantized_ok=True)


# -- the commands ----------------------------------------------------------------------------------------------

GEN = ["generate", "--prompt", "The cat", "--device", "cpu", "--max-new-tokens", "6", "--temperature", "0"]


def test_generate_quantize_int4_takes_a_group_size_and_says_what_it_saved(saved, capsys, monkeypatch):
    import tritongpt.commands as commands
    from tritongpt import cli

    models = []
    real = commands.quantize
    monkeypatch.setattr(commands, "quantize", lambda model, *a: models.append(model) or real(model, *a))
    for group, want in ((None, 128), ("32", 32)):
        assert cli.main([*GEN, "--weights", str(saved), "--quantize", "int4",
                         *(["--group-size", group] if group else [])]) == 0
        assert f"int4 (group {want}) weight-only: 7 matrices" in capsys.readouterr().err
        assert (models[-1].quantized, models[-1].quantized_group_size) == ("int4", want)
    for argv, err in ((["--group-size", "32"], "--group-size sets int4's groups: pass --quantize int4 too"),
                      (["--quantize", "int8", "--group-size", "32"],
                       "--group-size sets int4's groups; it does nothing with --quantize int8")):
        assert cli.main([*GEN, "--weights", str(saved), *argv]) == 2
        assert err in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (argparse's own error)
        cli.main([*GEN, "--weights", str(saved), "--quantize", "int4", "--group-size", "24"])
    assert "invalid choice: 24" in capsys.readouterr().err


def test_the_quantize_command_writes_an_int4_folder_the_commands_run_as_the_flag_would(saved, tmp_path, capsys):
    """`tritongpt quantize MODEL --out DIR --quantize int4 --group-size 32`: generate and eval on DIR give what
    --quantize int4 --group-size 32 on MODEL gives; info and eval's JSON say int4 and the group; --quantize int4 on
    the folder has nothing to do, another group size or int8 is refused."""
    from tritongpt import cli

    out = tmp_path / "int4"
    assert cli.main(["quantize", str(saved), "--out", str(out), "--quantize", "int4", "--group-size", "32"]) == 0
    said = capsys.readouterr().out
    assert said.startswith("quantize: int4 (group 32), 7 matrices, ") and str(out / "model.safetensors") in said
    flags = ["--quantize", "int4", "--group-size", "32"]
    assert cli.main([*GEN, "--weights", str(saved), *flags]) == 0
    want = capsys.readouterr().out
    assert cli.main([*GEN, "--weights", str(out)]) == 0
    assert capsys.readouterr().out == want
    assert cli.main([*GEN, "--weights", str(out), "--quantize", "int4"]) == 0
    assert "is int4 already (saved so): --quantize has nothing to do" in capsys.readouterr().err
    for argv, err in ((["--quantize", "int4", "--group-size", "64"],
                       "is int4 with group size 32 already (saved so), not 64"),
                      (["--quantize", "int8"], "the model is int4 (group 32) already (saved so), not int8: run it without "
                                               "--quantize")):
        assert cli.main([*GEN, "--weights", str(out), *argv]) == 2
        assert err in capsys.readouterr().err
    scores = []
    for args in (["--weights", str(saved), *flags], ["--weights", str(out)]):
        assert cli.main(["eval", *args, "--device", "cpu", "--max-tokens", "200", "--split", "all", "--json"]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["loss"] == scores[1]["loss"]
    assert [(s["quantize"], s["quantize_group_size"]) for s in scores] == [("int4", 32)] * 2
    assert cli.main(["info", "--weights", str(out)]) == 0
    info = capsys.readouterr().out
    assert "quantized    int4: 7 matrices (" in info and "an fp32 scale and offset a group of 32 inputs" in info
    assert "int4 LM head" in info
    assert cli.main(["quantize", str(saved), "--out", str(tmp_path / "x"), "--group-size", "32"]) == 2
    assert "it does nothing with --quantize int8" in capsys.readouterr().err


def test_a_draft_is_quantized_to_int4_at_the_group_size_and_a_draft_it_does_not_fit_is_named(saved, tmp_path, capsys):
    """generate --draft D --quantize int4 --group-size G: the draft quantized as the model is (its note says so),
    greedy text the int4 model's own; a draft whose widths G does not divide is refused naming the draft, not as
    if the model (which G fits) were at fault."""
    from tritongpt import cli
    from tritongpt.model.config import get_config

    base = [*GEN, "--weights", str(saved), "--quantize", "int4", "--group-size", "32"]
    assert cli.main(base) == 0
    want = capsys.readouterr().out
    assert cli.main([*base, "--draft", str(saved)]) == 0
    out = capsys.readouterr()
    assert out.out == want and "int4 (group 32) weight-only (the draft): 7 matrices" in out.err
    narrow = tmp_path / "narrow.safetensors"  # 48 wide: 16 divides it, 32 does not
    GPTModel(GPTConfig(**{**get_config("tiny").to_dict(), "n_layer": 1, "context_length": 32, "n_embd": 48,
                          "n_head": 4})).save(narrow)
    assert cli.main([*base, "--draft", str(narrow)]) == 2
    err = capsys.readouterr().err
    assert "the draft: trf_blocks.0.att.W_query: int4 quantization with group size 32 needs in_features a multiple" \
        in err, err


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_dtype_move_of_a_meta_layout_keeps_its_scales_fp32_for_the_file_to_fill(mode, tmp_path):
    """quantized_layout on the meta device (GPTModel.load's empty model), cast to fp16 before it is filled: the scales
    (and offsets) stay fp32 as on a real device, so loading a file's fp32 scales into them does not round them."""
    from safetensors.torch import load_model

    from tritongpt.model.quant import QuantLinear, quantized_layout

    model = quantize(tiny(), mode, group_size=16)
    model.save(tmp_path / "q.safetensors")
    with torch.device("meta"):
        empty = tiny()
    quantized_layout(empty, mode, group_size=16).half()
    kept = [(n, getattr(m, b)) for n, m in empty.named_modules() if isinstance(m, QuantLinear) for b in m.FP32_BUFFERS]
    assert len(kept) == 13 * (2 if mode == "int4" else 1)
    assert all(t.is_meta and t.dtype == torch.float32 for _, t in kept), [(n, t.dtype) for n, t in kept]
    empty.to_empty(device="cpu")
    load_model(empty, str(tmp_path / "q.safetensors"))
    want = dict(model.named_buffers())
    for n, m in empty.named_modules():
        if isinstance(m, QuantLinear):
            assert m.scale.dtype == torch.float32 and torch.equal(m.scale, want[f"{n}.scale"]), n
