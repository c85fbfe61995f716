"""QLoRA (Dettmers et al. 2023): LoRA updates trained beside a frozen int8/int4 base (model/quant.py QuantLinear.lora,
model/lora.py; `sft --lora-rank R --quantize int4`). The reference: the same LoRA on a float model whose weights are
the base's dequantized matrices (model/lora.py's parametrized Linears), which computes the same function; the
Triton path's quantized matmuls carry the gradient to x (kernels/quant.py's backward)."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import tritongpt.train.generate as gen
from tritongpt.cli import main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.lora import add_lora, has_lora, lora_parameters, merge_lora, strip_lora
from tritongpt.model.quant import Int4Linear, Int8Linear, QuantLinear, dequantize_model, quantize
from test_quantize_int4 import LLAMA, VOCAB, rel, tiny

def qlora(mode="int4", kernels="reference", rank=4, targets="attn,mlp", **extra):
    """A tiny model quantized (head float), with LoRA whose B is random (B starts at zero: nothing to compare)."""
    model = quantize(tiny(kernels, **extra), mode, head=False, group_size=32)
    add_lora(model, rank, 16.0, targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def float_twin(model):
    """The float model of model's function: its quantized matrices dequantized into Linears, the same LoRA A and B
    on them as model/lora.py's parametrizations (the float LoRA path)."""
    twin = copy.deepcopy(model)
    updates = {n: (m.lora.lora_A.detach().clone(), m.lora.lora_B.detach().clone())
               for n, m in twin.named_modules() if isinstance(m, QuantLinear) and m.lora is not None}
    for m in twin.modules():
        if isinstance(m, QuantLinear):
            m.lora = None
    cfg = twin.config
    rank, alpha, targets = cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets
    cfg.lora_rank = 0
    dequantize_model(twin)
    add_lora(twin, rank, alpha, targets)
    with torch.no_grad():
        for name, (a, b) in updates.items():
            upd = twin.get_submodule(name).parametrizations.weight[0]
            upd.lora_A.copy_(a)
            upd.lora_B.copy_(b)
    return twin


def lora_grads(model):
    return {n.replace(".parametrizations.weight.0", "").replace(".lora.", "."): p.grad
            for n, p in model.named_parameters() if p.requires_grad}


# -- the model -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("extra", [dict(), LLAMA, dict(gelu_approximate="none", tie_weights=False)])
def test_qlora_is_lora_on_the_dequantized_weights_forward_and_backward(mode, extra):
    """Loss and every trained gradient (each A and B) of the QLoRA model equal those of the float model whose
    weights are its dequantized ones with the same LoRA: the same function, computed the other way (the update
    beside the quantized matmul, not merged into the weight)."""
    model = qlora(mode, **extra).train()
    twin = float_twin(model).train()
    idx = torch.randint(0, VOCAB, (2, 13))
    loss = model(idx, targets=idx)
    want = twin(idx, targets=idx)
    loss.backward()
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 * want.item()
    got, ref = lora_grads(model), lora_grads(twin)
    assert sorted(got) == sorted(ref) and len(got) == 2 * 2 * (4 + (3 if extra is LLAMA else 2))
    for name, g in got.items():
        assert g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0, name
        assert rel(g, ref[name]) < 1e-5, (name, rel(g, ref[name]))
    with torch.no_grad():  # inference (no gradient: the Triton path would fuse a GELU without an update after it)
        assert rel(model.eval()(idx), twin.eval()(idx)) < 1e-5
    # only the updates train: the quantized matrices are buffers, the rest frozen
    assert all(n.endswith(("lora_A", "lora_B")) for n, p in model.named_parameters() if p.requires_grad)
    assert all(isinstance(m, Int4Linear if mode == "int4" else Int8Linear) for m in model.modules()
               if isinstance(m, QuantLinear))


def test_a_new_update_starts_where_the_quantized_model_is():
    base = quantize(tiny(), "int4", head=False, group_size=32).eval()
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = base(idx)
    add_lora(base, 4, 8.0)
    assert has_lora(base) and base.quantized == "int4"
    with torch.no_grad():
        assert torch.equal(base(idx), want)  # B = 0: the update adds zeros


def test_lora_on_a_model_whose_head_is_quantized_is_refused():
    model = quantize(tiny(), "int8")  # head=True: the fused head + loss needs a float head to train through
    with pytest.raises(UserError, match="LM head is int8-quantized too: LoRA on a quantized model"):
        add_lora(model, 4)
    assert not has_lora(model)


def test_merge_dequantizes_into_the_float_model_it_computes_and_strip_keeps_the_quantized_base():
    model = qlora("int4").eval()
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = model(idx)
        base = strip_lora(copy.deepcopy(model))
        assert not has_lora(base) and base.quantized == "int4" and base.config.lora_rank == 0
        assert rel(base(idx), want) > 1e-3  # without the updates: another function
        merged = merge_lora(model)
        assert merged.quantized is None and merged.config.lora_rank == 0 and not has_lora(merged)
        assert not any(isinstance(m, QuantLinear) for m in merged.modules())
        assert all(p.requires_grad for p in merged.parameters())
        assert rel(merged(idx), want) < 1e-5


def test_merging_a_bf16_qlora_model_keeps_it_bf16():
    # the merged Linears in the model's dtype, as merge_lora's float Linears are: fp32 ones in a bf16 model would
    # make every forward fail (mat1 and mat2 of different dtypes)
    model = qlora("int8").eval().to(torch.bfloat16)
    idx = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = model(idx)
        merged = merge_lora(model)
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        assert rel(merged(idx), want) < 2e-2  # (bf16: the merged weight rounds W + scale B A once more)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_a_qlora_checkpoint_loads_with_its_updates_and_runs_unmerged(tmp_path, kernels):
    from tritongpt.train.gpt2_weights import load_checkpoint

    model = qlora("int4", targets="attn").eval()
    idx = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        want = model(idx)
    model.save(tmp_path / "q.safetensors")
    with pytest.raises(UserError, match="is a QLoRA checkpoint \\(LoRA updates on an int4 base\\)"):
        GPTModel.load(tmp_path / "q.safetensors")
    got = load_checkpoint(tmp_path / "q.safetensors", quantized_ok=True)
    assert got.quantized == "int4" and got.config.lora_rank == 4 and has_lora(got)
    assert sorted(got.state_dict()) == sorted(model.state_dict())
    got.set_kernels(kernels)
    with torch.no_grad():
        assert rel(got(idx), want) < 1e-5
    assert torch.equal(gen.generate(got, idx, 3), gen.generate(got, idx, 3, use_cache=False))


@pytest.mark.parametrize("extra", [dict(), LLAMA])
def test_the_triton_path_trains_qlora_as_the_reference_does(extra):
    """The Triton path: the quantized matmuls' kernels carry the gradient to x (kernels/quant.py's backward), the
    GELU unfused where its input is needed; loss and every A and B gradient match the reference path's."""
    ref = qlora("int4", **extra).train()
    tri = copy.deepcopy(ref).set_kernels("triton")
    idx = torch.randint(0, VOCAB, (2, 11))
    losses = []
    for m in (ref, tri):
        loss = m(idx, targets=idx)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-5 * losses[0]
    want, got = lora_grads(ref), lora_grads(tri)
    for name, g in got.items():
        assert rel(g, want[name]) < 1e-4, (name, rel(g, want[name]))


@pytest.mark.cuda
def test_a_qlora_step_at_gpt2_width_on_cuda_matches_the_reference_path_under_bf16_autocast():
    """GPT-2 small's widths (two layers, int4 at G 128, rank 8 on attn,mlp) on a GPU in bf16: the Triton path's
    quantized matmuls and their dx kernels against the reference's dequantized F.linear, loss and every A, B gradient."""
    from tritongpt.model.config import get_config

    torch.manual_seed(0)
    cfg = GPTConfig(**{**get_config("gpt2-small").to_dict(), "n_layer": 2})
    ref = quantize(GPTModel(cfg), "int4", head=False, device="cuda").cuda()
    add_lora(ref, 8)
    with torch.no_grad():
        for p in lora_parameters(ref):
            p.copy_(torch.randn_like(p) * 0.02)
    tri = copy.deepcopy(ref).set_kernels("triton")
    idx = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    losses = []
    for m in (ref.train(), tri.train()):
        with torch.autocast("cuda", torch.bfloat16):
            loss = m(idx, targets=idx)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-2 * losses[0]
    want, got = lora_grads(ref), lora_grads(tri)
    for name, g in got.items():
        assert rel(g, want[name]) < 3e-2, (name, rel(g, want[name]))


# -- sft --quantize (QLoRA) ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qlora_base")
    GPTModel(GPTConfig(vocab_size=4096, context_length=64, n_embd=64, n_layer=1, n_head=2)).save(
        folder / "model.safetensors")
    save_run_tokenizer(default_tokenizer(), folder)
    return folder


def sft_argv(base, out, *extra):
    data = out.parent / "says.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}) + "\n"
                            for w in ("hi", "yes", "no", "ok", "up", "go", "on", "in") * 2))
    return ["sft", "--init", str(base), "--data", str(data), "--out-dir", str(out), "--batch-size", "4",
            "--eval-every", "0", "--eval-gen", "0", "--sample-every", "0", "--max-new-tokens", "2", "--device", "cpu",
            "--kernels", "reference", "--log-every", "0", "--lr", "1e-2", "--warmup-steps", "0", *extra]


def test_sft_quantize_trains_the_updates_on_the_quantized_base_and_its_run_loads_resumes_and_exports(base, tmp_path,
                                                                                                    capsys):
    from tritongpt.train import common

    out = tmp_path / "run"
    flags = ("--lora-rank", "4", "--quantize", "int4", "--group-size", "32")
    assert main(sft_argv(base, out, "--max-steps", "6", *flags)) == 0
    err = capsys.readouterr().err
    assert "QLoRA: the base's 6 matrices int4 (group 32) weight-only" in err and "the LM head stays float" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]  # it learns (lr 1e-2 on 16 short records)
    ckpt = common.resume_checkpoint(out, "latest")
    state = common.load_state(ckpt)
    assert (state["args"]["quantize"], state["args"]["group_size"]) == ("int4", 32)
    from tritongpt.train.gpt2_weights import load_checkpoint

    model = load_checkpoint(out, quantized_ok=True)
    assert model.quantized == "int4" and model.quantized_group_size == 32 and has_lora(model)
    assert not model.quantized_head and isinstance(model.out_head, nn.Linear)
    # the frozen base is the --init model's matrices quantized, untouched by training
    frozen = quantize(GPTModel.load(base / "model.safetensors"), "int4", head=False, group_size=32)
    for name, buf in frozen.named_buffers():
        assert torch.equal(buf, model.get_buffer(name)), name
    # generate runs it as it is (unmerged); export writes the float model it computes
    gen_args = ["generate", "--prompt", "Say hi.", "--device", "cpu", "--max-new-tokens", "4", "--temperature", "0"]
    assert main([*gen_args, "--weights", str(out)]) == 0
    text = capsys.readouterr().out
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main([*gen_args, "--weights", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out == text
    exported = load_checkpoint(tmp_path / "hf")
    idx = torch.randint(0, 4096, (1, 9))
    with torch.no_grad():
        assert rel(exported(idx), model.eval()(idx)) < 1e-5
    assert main(["export", str(out), "--out", str(tmp_path / "adapter"), "--adapter"]) == 2
    assert "is a QLoRA checkpoint (LoRA updates on an int4 base), whose adapter export" in capsys.readouterr().err
    # a resume goes on from the checkpoint (the base quantized again the same way, the updates loaded)
    assert main(sft_argv(base, out, "--max-steps", "8", "--resume", *flags)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [7, 8]
    # a trainer's --init refuses the QLoRA checkpoint by name
    assert main(sft_argv(base, tmp_path / "again", "--max-steps", "1", "--init", str(out))) == 2
    assert "is a QLoRA checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flags,said", [
    (["--quantize", "int4"], "--quantize int4 freezes the base's matrices as int4: they train only through LoRA"),
    (["--group-size", "32", "--lora-rank", "4"], "--group-size sets int4's groups: pass --quantize int4 too"),
    (["--quantize", "int8", "--group-size", "32", "--lora-rank", "4"], "it does nothing with --quantize int8"),
])
def test_sft_quantize_refuses_what_it_cannot_train(base, tmp_path, capsys, flags, said):
    assert main(sft_argv(base, tmp_path / "bad", "--max-steps", "1", *flags)) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flags,said", [
    (["--quantize", "int4", "--group-size", "16"], "(this run: int4 (group 16))"),
    (["--quantize", "int8"], "(this run: int8)"),
    ([], "(this run: float)"),
])
def test_a_qlora_resume_with_another_base_is_refused_naming_the_flags(base, tmp_path, capsys, flags, said):
    # the base's quantization is in the weights file: resumed otherwise, its tensors would not fit the model, and
    # torch's first line ("Error(s) in loading state_dict") names no flag
    out = tmp_path / "run"
    assert main(sft_argv(base, out, "--max-steps", "1", "--lora-rank", "4", "--quantize", "int4",
                         "--group-size", "32")) == 0
    capsys.readouterr()
    assert main(sft_argv(base, out, "--max-steps", "2", "--resume", "--lora-rank", "4", *flags)) == 2
    err = capsys.readouterr().err
    assert "its base is int4 (group 32)" in err and said in err and "pass --quantize int4 --group-size 32" in err


def test_a_lora_resume_with_quantize_is_refused_naming_it(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sft_argv(base, out, "--max-steps", "1", "--lora-rank", "4")) == 0
    capsys.readouterr()
    assert main(sft_argv(base, out, "--max-steps", "2", "--resume", "--lora-rank", "4", "--quantize", "int8")) == 2
    err = capsys.readouterr().err
    assert "its base is float (this run: int8)" in err and "resume without --quantize" in err
