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
from tritongpt.model.quant import Int4Linear, Int8Linear, QuantLinear, dequantize_model, quantize, unpack_int4
from test_quantize import LLAMA, VOCAB, rel, tiny


def qlora(mode="int4", kernels="reference", rank=4, targets="attn,mlp", **extra):
    """A tiny model quantized (head float), with LoRA whose B is random (B starts at zero: nothing to compare)."""
    model = quantize(tiny(kernels, **extra), mode, head=False, group_size=32)
    add_lora(model, rank, 16.0, targets)
    torch.manual_seed(1)
    return random_updates(model, 0.1)


def random_updates(model, std):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * std)
    return model


def compare_paths(ref, idx, loss_rtol, grad_rtol, autocast=None):
    """One backward of ref (the reference path) and of its copy on the Triton path: the losses within loss_rtol,
    every A and B gradient within grad_rtol of the reference's."""
    tri = copy.deepcopy(ref).set_kernels("triton")
    losses = []
    for m in (ref.train(), tri.train()):
        with torch.autocast(idx.device.type, autocast, enabled=autocast is not None):
            loss = m(idx, targets=idx)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < loss_rtol * losses[0]
    want, got = lora_grads(ref), lora_grads(tri)
    for name, g in got.items():
        assert rel(g, want[name]) < grad_rtol, (name, rel(g, want[name]))


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


@pytest.mark.parametrize("mode,extra", [("int4", dict()), ("int4", LLAMA), ("int8", LLAMA)],
                         ids=["int4-gpt2", "int4-llama", "int8-llama"])
def test_the_triton_path_trains_qlora_as_the_reference_does(mode, extra):
    """The Triton path: the quantized matmuls' kernels carry the gradient to x (kernels/quant.py's backward: the
    int8 and the int4 dx kernels), the GELU unfused where its input is needed; loss and every A and B gradient
    match the reference path's."""
    compare_paths(qlora(mode, **extra), torch.randint(0, VOCAB, (2, 11)), 1e-5, 1e-4)


@pytest.mark.cuda
def test_a_qlora_step_at_gpt2_width_on_cuda_matches_the_reference_path_under_bf16_autocast():
    """GPT-2 small's widths (two layers, int4 at G 128, rank 8 on attn,mlp) on a GPU in bf16: the Triton path's
    quantized matmuls and their dx kernels against the reference's dequantized F.linear, loss and every A, B gradient."""
    from tritongpt.model.config import get_config

    torch.manual_seed(0)
    cfg = GPTConfig(**{**get_config("gpt2-small").to_dict(), "n_layer": 2})
    ref = quantize(GPTModel(cfg), "int4", head=False, device="cuda").cuda()
    add_lora(ref, 8)
    idx = torch.randint(0, cfg.vocab_size, (4, 256), device="cuda")
    compare_paths(random_updates(ref, 0.02), idx, 1e-2, 3e-2, autocast=torch.bfloat16)


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
    runs_unmerged_and_exports_its_function(out, model, tmp_path / "hf", "Say hi.", capsys)
    # its adapter goes on the --init, which is our own checkpoint here, not a folder peft loads (the tests below)
    assert main(["export", str(out), "--out", str(tmp_path / "adapter"), "--adapter"]) == 2
    assert "is not a Hugging Face GPT-2 folder (config.json and model.safetensors)" in capsys.readouterr().err
    # a resume goes on from the checkpoint (the base quantized again the same way, the updates loaded)
    assert main(sft_argv(base, out, "--max-steps", "8", "--resume", *flags)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [7, 8]
    # a trainer's --init refuses the QLoRA checkpoint by name
    assert main(sft_argv(base, tmp_path / "again", "--max-steps", "1", "--init", str(out))) == 2
    assert "is a QLoRA checkpoint" in capsys.readouterr().err


def runs_unmerged_and_exports_its_function(run, model, hf, prompt, capsys):
    """A QLoRA run's checkpoint (model, loaded): generate runs it as it is (unmerged); `export` writes the float model
    it computes (the base dequantized plus the update) into hf: the same greedy text, logits within 1e-5."""
    from tritongpt.train.gpt2_weights import load_checkpoint

    gen_args = ["generate", "--prompt", prompt, "--device", "cpu", "--max-new-tokens", "4", "--temperature", "0"]
    assert main([*gen_args, "--weights", str(run)]) == 0
    text = capsys.readouterr().out
    assert main(["export", str(run), "--out", str(hf)]) == 0
    capsys.readouterr()
    assert main([*gen_args, "--weights", str(hf)]) == 0
    assert capsys.readouterr().out == text
    idx = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert rel(load_checkpoint(hf)(idx), model.eval()(idx)) < 1e-5


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


# -- export --adapter: a QLoRA run's update as a peft adapter for its float base -------------------------------

@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A tiny GPT-2 as a Hugging Face folder (config.json, model.safetensors): a base peft loads an adapter onto."""
    from tritongpt.train.gpt2_weights import export_gpt2

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("qlora_hf_base")
    export_gpt2(GPTModel(GPTConfig(vocab_size=4096, context_length=64, n_embd=64, n_layer=1, n_head=2)), folder)
    return folder


@pytest.mark.parametrize("mode,group", [("int4", "32"), ("int8", None)])
def test_a_qlora_runs_adapter_goes_on_its_float_base_with_the_update_it_trained(hf_base, tmp_path, capsys, mode,
                                                                                  group):
    """`export RUN --adapter` of a QLoRA run writes its A and B for the float --init (compared with the run's frozen
    base quantized the same way). Loaded back (tritongpt's --weights ADAPTER, and peft on the base folder) it is the
    float base plus the update: not the run's own function, whose matrices were the base's quantized ones (each
    weight off by up to half a quantization step): the same A and B on other frozen weights."""
    from tritongpt.train.gpt2_weights import export_gpt2, load_checkpoint

    out, adapter = tmp_path / "run", tmp_path / "adapter"
    flags = ("--lora-rank", "4", "--quantize", mode, *(("--group-size", group) if group else ()))
    assert main(sft_argv(hf_base, out, "--max-steps", "3", "--tokenizer", "default", *flags)) == 0
    capsys.readouterr()
    # another GPT-2 of the same shapes as --base: refused by name, nothing written
    other = tmp_path / "other"
    torch.manual_seed(9)
    export_gpt2(GPTModel(GPTConfig(vocab_size=4096, context_length=64, n_embd=64, n_layer=1, n_head=2)), other)
    assert main(["export", str(out), "--out", str(adapter), "--adapter", "--base", str(other)]) == 2
    assert (f"--base {other} is not the model this LoRA update was trained on: its transformer.wte.weight differs"
            in capsys.readouterr().err)
    assert not adapter.exists()
    assert main(["export", str(out), "--out", str(adapter), "--adapter"]) == 0
    captured = capsys.readouterr()
    assert f"for the base {hf_base}" in captured.out and "the adapter goes on the float base" in captured.err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_base) and config["r"] == 4
    run = load_checkpoint(out, merge=False, quantized_ok=True).eval()
    assert run.quantized == mode
    # what the adapter should be: the float base with the run's A and B as float LoRA (model/lora.py)
    want = add_lora(load_checkpoint(hf_base), 4, run.config.lora_alpha, run.config.lora_targets).eval()
    with torch.no_grad():
        for name, m in run.named_modules():
            if isinstance(m, QuantLinear) and m.lora is not None:
                update = want.get_submodule(name).parametrizations.weight[0]
                assert m.lora.lora_B.abs().max() > 0, name  # trained: not the zero update it starts as
                update.lora_A.copy_(m.lora.lora_A)
                update.lora_B.copy_(m.lora.lora_B)
    idx = torch.randint(0, 4096, (2, 17))
    with torch.no_grad():
        want_logits, run_logits = want(idx), run(idx)
        got = load_checkpoint(adapter)(idx)
        print(f"adapter on the float base vs float base + update: rel {rel(got, want_logits):.2e}; "
              f"vs the quantized run: rel {rel(got, run_logits):.2e}")
        assert rel(got, want_logits) < 1e-5
        assert rel(got, run_logits) > 100 * rel(got, want_logits)  # the quantized run's is another function
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    with torch.no_grad():  # float64: peft's merge and ours round differently in fp32
        on_base = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(hf_base), adapter)
        theirs = on_base.eval().double()(idx).logits
        print(f"peft on the float base (float64): rel {rel(theirs, copy.deepcopy(want).double()(idx)):.2e}")
        assert rel(theirs, copy.deepcopy(want).double()(idx)) <= 1e-12  # float64 rounding only (measured ~6e-16)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_qlora_adapters_base_must_quantize_to_the_runs_and_keep_its_float_tensors_exactly(tmp_path, mode):
    """The run holds its matrices quantized and the rest float (embeddings, norms, the LM head, the matrices' biases,
    buffers of the QuantLinears): a base is its --init when its matrices quantize to the run's buffers bit for bit and
    every float tensor is equal. A base off by one float32 step in any float tensor is refused (quantized, the
    matrices would hide nothing of it: those tensors are not quantized), as is one whose matrix weight moved enough
    to change its quantization; a matrix weight moved within its quantization step is the run's frozen model
    exactly (the float matrices are not in the run: nothing tells them apart), accepted."""
    from safetensors.torch import load_file, save_file

    from tritongpt.train.gpt2_weights import adapter_base, export_gpt2

    torch.manual_seed(4)
    cfg = dict(vocab_size=VOCAB, context_length=24, n_layer=2, n_head=4, n_embd=64)
    float_base = GPTModel(GPTConfig(**cfg, tie_weights=False)).eval()
    with torch.no_grad():  # biases and norms away from their 0 / 1 init: a step up is a step in a real value
        for name, p in float_base.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    frozen = quantize(copy.deepcopy(float_base), mode, head=False, group_size=32)

    def base_like(name, edit=None, model=float_base):
        folder = tmp_path / name
        export_gpt2(model, folder)
        if edit:
            tensors = load_file(folder / "model.safetensors")
            edit(tensors)
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return str(folder)

    def up(key, i=3):
        def edit(t):
            t[key].view(-1)[i] = torch.nextafter(t[key].view(-1)[i], torch.tensor(float("inf")))
        return edit

    assert adapter_base(base_like("same"), None, frozen) == str(tmp_path / "same")
    fc2 = frozen.trf_blocks[1].ff.fc2  # Hugging Face's h.1.mlp.c_proj, [in, out]: our [out, in] transposed
    w, d = float_base.trf_blocks[1].ff.fc2.weight.detach(), fc2.dequantize()
    q = unpack_int4(fc2.qweight).view_as(w).int() if mode == "int4" else fc2.qweight.int()
    inner = ((q > 0) & (q < 15) if mode == "int4" else q.abs() < 100) & (d != w)  # no extreme: scales unchanged
    n, k = (int(i) for i in inner.nonzero()[0])

    def within_step(t):  # the weight moved to its dequantized value: it quantizes the same
        t["transformer.h.1.mlp.c_proj.weight"][k, n] = d[n, k]

    def past_step(t):  # the row's (and group's) largest weight, doubled: its scale changes
        t["transformer.h.1.mlp.c_proj.weight"][k, n] = 2 * w[n].abs().max()

    assert adapter_base(base_like("within", within_step), None, frozen) == str(tmp_path / "within")

    def huge(t):  # finite weights whose int4 range overflows fp32 (a file holding none loads; the run had none)
        t["transformer.h.0.mlp.c_fc.weight"][0:2, 0] = torch.tensor([3e38, -3e38])

    how = "int4, group 32" if mode == "int4" else "int8"
    torch.manual_seed(5)
    other = GPTModel(GPTConfig(**cfg, tie_weights=False))
    for base, said in (
            (base_like("other", model=other), r"its transformer.wte.weight differs by up to \d"),
            (base_like("wte", up("transformer.wte.weight")), r"its transformer.wte.weight differs by up to \d"),
            (base_like("ln", up("transformer.h.0.ln_2.weight")), r"its transformer.h.0.ln_2.weight differs"),
            (base_like("bias", up("transformer.h.1.attn.c_attn.bias", 70)), "its transformer.h.1.attn.c_attn.bias differs"),
            (base_like("head", up("lm_head.weight")), "its lm_head.weight differs"),
            (base_like("past", past_step), rf"its transformer.h.1.mlp.c_proj.weight, quantized as the run's "
                                           rf"\({how}\), differs \(fc2's scale in 1 of"),
            (base_like("huge", huge), r"its matrices do not quantize as the run's \(int4, group 32\): cannot "
             "int4-quantize row 0, group 0" if mode == "int4" else "its transformer.h.0.mlp.c_fc.weight, quantized")):
        with pytest.raises(UserError, match="--base .* is not the model this LoRA update was trained on: " + said):
            adapter_base(base, None, frozen)


def test_an_int4_run_recorded_before_its_default_group_was_resumes_without_a_note(tmp_path, capsys):
    # sft runs from before the record kept the group size used wrote None for int4's default (128): the same
    # run resumed now is not a change of --group-size
    from tritongpt.train import common
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    wide = tmp_path / "wide"  # a width of 128: int4's default group
    wide.mkdir()
    torch.manual_seed(5)
    GPTModel(GPTConfig(vocab_size=4096, context_length=64, n_embd=128, n_layer=1, n_head=2)).save(
        wide / "model.safetensors")
    save_run_tokenizer(default_tokenizer(), wide)
    out = tmp_path / "run"
    flags = ("--lora-rank", "2", "--quantize", "int4")
    assert main(sft_argv(wide, out, "--max-steps", "1", *flags)) == 0
    ckpt = common.resume_checkpoint(out, "latest")
    state = common.load_state(ckpt)
    assert state["args"]["group_size"] == 128
    state["args"]["group_size"] = None  # as yesterday's run recorded it
    torch.save(state, ckpt / "state.pt")
    capsys.readouterr()
    assert main(sft_argv(wide, out, "--max-steps", "2", "--resume", *flags)) == 0
    err = capsys.readouterr().err
    assert "--group-size" not in err, err
