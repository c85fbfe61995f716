"""QLoRA for `rlhf` (every --algo): `--lora-rank R --quantize int8|int4 [--quantize-group-size G]` (rlhf's --group-size
is GRPO's and RLOO's responses per prompt). The policy's base is quantized before the reference is copied from it, so
the reference is the quantized base (the policy with its updates at 0: the KL starts at exactly 0); PPO's value head
stays float and trains whole; rollouts run the quantized matmuls plus the LoRA branch a token a step; a resume
quantizes the --init again the same way (another quantization is refused naming the flags); generate, export and
export --adapter read the run as they read sft's (tests/test_qlora.py)."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from tritongpt.cli import main
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.model.lora import add_lora, has_lora
from tritongpt.model.quant import QuantLinear, quantize
from tritongpt.train import common
from tritongpt.train.gpt2_weights import load_checkpoint
from parity import assert_close_rel
from test_qlora import qlora, random_updates, runs_unmerged_and_exports_its_function
from test_quantize import VOCAB, rel

CFG = dict(vocab_size=4096, context_length=128, n_embd=64, n_layer=1, n_head=2)
QLORA = ("--lora-rank", "4", "--quantize", "int4", "--quantize-group-size", "32")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny --init (our own checkpoint folder with the project's tokenizer) and a random reward model for it."""
    from tritongpt.train.reward import RewardModel
    from tritongpt.train.tokenizer import default_tokenizer, save_run_tokenizer

    folder = tmp_path_factory.mktemp("qlora_rlhf_base")
    torch.manual_seed(0)
    GPTModel(GPTConfig(**CFG)).save(folder / "model.safetensors")
    save_run_tokenizer(default_tokenizer(), folder)
    torch.manual_seed(1)
    RewardModel(GPTModel(GPTConfig(**CFG))).save(folder / "rm.safetensors")
    return folder


def rlhf_argv(init, out, algo="ppo", reward=None, *extra):
    """One small rlhf run: 2 prompts an iteration, 4 new tokens, lr 1e-2 (the updates move in one step)."""
    return ["rlhf", "--init", str(init), "--reward", str(reward or "exact"), "--algo", algo, "--num-pairs", "16",
            "--prompts-per-iter", "2", "--max-new-tokens", "4", "--epochs", "1", "--minibatch-size", "4",
            "--eval-prompts", "2", "--eval-samples", "1", "--device", "cpu", "--kernels", "reference", "--lr", "1e-2",
            "--out-dir", str(out), *extra]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rlhf_ppo_qlora_trains_the_updates_and_value_head_on_the_quantized_base_and_its_run_resumes_and_exports(
        base, tmp_path, capsys):
    out = tmp_path / "run"
    argv = rlhf_argv(base, out, "ppo", base / "rm.safetensors", *QLORA)
    assert main([*argv, "--iterations", "2", "--ckpt-every", "1"]) == 0
    err = capsys.readouterr().err
    assert "QLoRA: the base's 6 matrices int4 (group 32) weight-only" in err
    assert "of them the base's int4 matrices, and the new value head whole" in err
    logged = rows(out)
    first = next(r for r in logged if r["step"] == 1 and "kl" in r)
    # the first rollout's policy is the reference exactly (its updates at 0, on the same quantized matrices)
    assert first["kl"] == 0.0 and first["approx_kl"] == 0.0 and first["grad_norm"] > 0
    second = next(r for r in logged if r["step"] == 2 and "kl" in r)
    assert second["kl"] != 0.0  # the updates moved the policy in the first step
    ckpt = common.resume_checkpoint(out, "latest")
    state = common.load_state(ckpt)
    # the int4 group is recorded under its own name: group_size stays PPO's responses per prompt
    assert (state["args"]["quantize"], state["args"]["quantize_group_size"], state["args"]["group_size"]) == \
        ("int4", 32, 0)
    assert len(state["optimizer"]["state"]) == 2 * 6 + 2  # A and B of 6 matrices, the value head's w and b
    assert all(v.dtype == torch.float32 for v in state["value_head"].values())
    model = load_checkpoint(out, quantized_ok=True)
    assert model.quantized == "int4" and model.quantized_group_size == 32 and has_lora(model)
    assert not model.quantized_head and isinstance(model.out_head, nn.Linear)
    frozen = quantize(GPTModel.load(base / "model.safetensors"), "int4", head=False, group_size=32)
    for name, buf in frozen.named_buffers():
        assert torch.equal(buf, model.get_buffer(name)), name  # the base untouched by training
    trained = [m.lora.lora_B for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(trained) == 6 and all(b.abs().max() > 0 for b in trained)
    runs_unmerged_and_exports_its_function(out, model, tmp_path / "hf", "What is 2 plus 2?", capsys)
    # a resume quantizes the --init again the same way and loads the updates and the value head
    assert main([*argv, "--iterations", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in rows(out) if "kl" in r][-3:] == [1, 2, 3]
    # another trainer's --init refuses the QLoRA checkpoint by name, as sft's
    assert main(["sft", "--init", str(out), "--out-dir", str(tmp_path / "sft"), "--max-steps", "1",
                 "--device", "cpu"]) == 2
    assert "is a QLoRA checkpoint" in capsys.readouterr().err


def test_a_resume_is_exact_bit_for_bit(base, tmp_path):
    """Two iterations straight and one plus a resume: the same updates and value head (the base quantized again
    the same way, the updates, value head, optimizer and generators loaded)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    argv = ("ppo", base / "rm.safetensors", *QLORA, "--ckpt-every", "1")
    assert main([*rlhf_argv(base, straight, *argv), "--iterations", "2"]) == 0
    assert main([*rlhf_argv(base, split, *argv), "--iterations", "1"]) == 0
    assert main([*rlhf_argv(base, split, *argv), "--iterations", "2", "--resume"]) == 0
    a, b = (load_checkpoint(o, quantized_ok=True).state_dict() for o in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va, vb = (common.load_state(common.resume_checkpoint(o, "latest"))["value_head"] for o in (straight, split))
    assert all(torch.equal(va[k], vb[k]) for k in va)


@pytest.mark.parametrize("flags,said", [
    (["--quantize", "int4", "--quantize-group-size", "16"], "(this run: int4 (group 16))"),
    (["--quantize", "int4", "--quantize-group-size", "64"], "(this run: int4 (group 64))"),
    (["--quantize", "int8"], "(this run: int8)"),
    ([], "(this run: float)"),
])
def test_a_qlora_resume_with_another_base_is_refused_naming_the_flags(base, tmp_path, capsys, flags, said):
    out = tmp_path / "run"
    assert main([*rlhf_argv(base, out, "grpo", None, *QLORA), "--iterations", "1"]) == 0
    capsys.readouterr()
    assert main([*rlhf_argv(base, out, "grpo", None, "--lora-rank", "4", *flags), "--iterations", "2",
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "its base is int4 (group 32)" in err and said in err and "pass --quantize int4 --quantize-group-size 32" \
        in err


def test_a_lora_rlhf_resume_with_quantize_is_refused_naming_it(base, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*rlhf_argv(base, out, "rloo"), "--lora-rank", "4", "--iterations", "1"]) == 0
    capsys.readouterr()
    assert main([*rlhf_argv(base, out, "rloo"), "--lora-rank", "4", "--quantize", "int8", "--iterations", "2",
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "its base is float (this run: int8)" in err and "resume without --quantize" in err


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_grpo_and_rloo_qlora_start_at_the_reference_and_keep_their_group_size(base, tmp_path, capsys, algo):
    """int8 this time; --group-size stays GRPO's and RLOO's responses per prompt beside --quantize."""
    out = tmp_path / "run"
    assert main([*rlhf_argv(base, out, algo, base / "rm.safetensors", "--lora-rank", "4", "--quantize", "int8",
                            "--group-size", "3"), "--iterations", "1"]) == 0
    assert "QLoRA: the base's 6 matrices int8 weight-only" in capsys.readouterr().err
    first = next(r for r in rows(out) if "kl" in r)
    assert first["kl"] == 0.0
    state = common.load_state(common.resume_checkpoint(out, "latest"))
    assert (state["args"]["quantize"], state["args"]["quantize_group_size"], state["args"]["group_size"]) == \
        ("int8", None, 3)
    model = load_checkpoint(out, quantized_ok=True)
    assert model.quantized == "int8" and has_lora(model)


@pytest.mark.parametrize("flags,said", [
    (["--quantize", "int4"], "--quantize int4 freezes the base's matrices as int4: they train only through LoRA"),
    (["--quantize-group-size", "32", "--lora-rank", "4"],
     "--quantize-group-size sets int4's groups: pass --quantize int4 too"),
    (["--quantize", "int8", "--quantize-group-size", "32", "--lora-rank", "4"],
     "--quantize-group-size sets int4's groups; it does nothing with --quantize int8"),
])
def test_rlhf_quantize_refuses_what_it_cannot_train_before_any_file(base, tmp_path, capsys, flags, said):
    assert main([*rlhf_argv(base, tmp_path / "bad", "grpo", None, *flags), "--iterations", "1"]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_an_int4_group_that_does_not_fit_the_base_names_rlhfs_own_flag(base, tmp_path, capsys):
    # int4's default group (128) does not divide this base's width (64); rlhf's --group-size is GRPO's, so the fix
    # the error names must be --quantize-group-size
    assert main([*rlhf_argv(base, tmp_path / "run", "grpo", None, "--lora-rank", "4", "--quantize", "int4"),
                 "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert "group size 128 needs in_features a multiple of it" in err and "--quantize-group-size" in err, err


def test_cuda_graphs_with_a_qlora_policy_are_refused_off_cuda_at_startup(base, tmp_path, capsys):
    assert main([*rlhf_argv(base, tmp_path / "run", "grpo", None, *QLORA), "--cuda-graphs", "--iterations", "1"]) == 2
    assert "--cuda-graphs replays the rollouts' decode steps as CUDA graphs: it needs a CUDA device, the run is on " \
           "cpu" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- rollouts: the quantized matmuls and the LoRA branch at one token a step --------------------------------------

def test_qlora_rollouts_are_the_same_on_both_kernel_paths_and_with_an_emulated_decode_graph(monkeypatch):
    """sample_responses on a QLoRA policy (random updates: the branch counts) draws the same tokens with the KV cache
    on the reference path, on the Triton path (the quantized matmul kernels at M = a row a step), and with each
    decode step replayed from a capture (tests/test_decode_graph.py's fx_capture: a CUDA graph's semantics)."""
    import tritongpt.train.generate as gen
    from test_decode_graph import fx_capture
    from tritongpt.train import rlhf

    # two heads of 32 (not four of 16): half the attention kernel's programs, the matrices (what is quantized) as wide
    policy = qlora("int4", n_layer=1, n_head=2)
    prompts = [[5, 6, 7], [1, 2, 3]]  # (one length: one batch, one capture; the interpreter's time)
    drawn_from = []  # each rollout's decode steps' log-probabilities [rows, steps, V], as generate drew from them
    generate = rlhf.generate

    def recording(*args, **kw):
        steps = []
        out = generate(*args, **kw, logprobs=VOCAB,
                       on_token=lambda nxt, lp: steps.append(torch.empty_like(lp[2]).scatter_(1, lp[1], lp[2])))
        drawn_from.append(torch.stack(steps, 1))
        return out
    monkeypatch.setattr(rlhf, "generate", recording)

    def rollout(model, graph=False):
        return rlhf.sample_responses(model, prompts, 2, 4, eot_id=VOCAB - 1, temperature=0.7,
                                     generator=torch.Generator().manual_seed(0), cuda_graph=graph)
    want = rollout(policy)
    triton = copy.deepcopy(policy).set_kernels("triton")
    tri = rollout(triton)
    assert torch.equal(tri.idx, want.idx) and torch.equal(tri.lengths, want.lengths)
    captured = []
    monkeypatch.setattr(gen, "capture_cuda_graph", lambda fn, device: captured.append(device) or fx_capture(fn))
    for model in (policy, triton):
        got = rollout(model, graph=True)
        assert torch.equal(got.idx, want.idx) and torch.equal(got.lengths, want.lengths)
    assert len(captured) == 2  # one a path
    # the same tokens barely test the matmuls (an int4 kernel's output 5% off drew them too): every step's
    # distribution is the float64 policy's over the drawn tokens (the same quantized values, dequantized), compared as
    # logits (log-probabilities less their mean: -log V would hide a logit's error), fp32 1e-4 relative (measured
    # <= 1.8e-6; that kernel's 5%: 1.9e-2)
    with torch.no_grad():
        exact = torch.log_softmax(copy.deepcopy(policy).double()(want.idx[:, :-1]), -1)[:, len(prompts[0]) - 1:]
    assert len(drawn_from) == 4  # a generate a rollout (one prompt length)
    for lp, name in zip(drawn_from, ("reference", "triton", "reference graph", "triton graph")):
        assert lp.shape == exact.shape, (name, lp.shape, exact.shape)
        assert_close_rel(lp - lp.mean(-1, keepdim=True), exact - exact.mean(-1, keepdim=True), 1e-4,
                         f"{name} rollout's logits")
    # without the updates the policy is another one: the branch is in what was drawn
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, QuantLinear):
                m.lora.lora_B.zero_()
    assert not torch.equal(rollout(policy).idx, want.idx)


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_qlora_rollouts_with_real_cuda_graphs_are_the_eager_ones_and_follow_the_updates(kernels):
    """On a GPU: a QLoRA policy's rollouts with each decode step a real CUDA-graph replay (the quantized matmul and
    the LoRA branch captured) draw the eager rollouts' tokens; after the updates change in place (an optimizer
    step's way) the next rollout's graph reads the new ones: again the eager tokens, and not the old ones."""
    from tritongpt.train.rlhf import sample_responses

    torch.manual_seed(0)
    policy = quantize(GPTModel(GPTConfig(vocab_size=512, context_length=64, n_embd=128, n_layer=2, n_head=4,
                                         kernels=kernels)), "int4", head=False, group_size=32).cuda().eval()
    add_lora(policy, 8)
    prompts = [[5, 6, 7, 8], [1, 2, 3, 4], [9, 8, 7]]

    def rollout(graph):
        return sample_responses(policy, prompts, 2, 8, eot_id=511, temperature=0.7,
                                generator=torch.Generator("cuda").manual_seed(0), cuda_graph=graph)
    old = None
    for std in (0.02, 0.2):
        random_updates(policy, std)  # in place, as the trainer's optimizer moves them between rollouts
        want, got = rollout(False), rollout(True)
        assert torch.equal(got.idx, want.idx) and torch.equal(got.lengths, want.lengths)
        assert old is None or not torch.equal(want.idx, old)
        old = want.idx


# -- export --adapter: an rlhf QLoRA run's update for its float GPT-2 base ----------------------------------------

@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    from tritongpt.train.gpt2_weights import export_gpt2

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("qlora_rlhf_hf_base")
    export_gpt2(GPTModel(GPTConfig(**CFG)), folder)
    return folder


def test_an_rlhf_qlora_runs_adapter_goes_on_its_float_base_with_the_update_it_trained(hf_base, base, tmp_path,
                                                                                        capsys):
    out, adapter = tmp_path / "run", tmp_path / "adapter"
    assert main([*rlhf_argv(hf_base, out, "ppo", base / "rm.safetensors", *QLORA), "--tokenizer", "default",
                 "--iterations", "1"]) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(adapter), "--adapter"]) == 0
    captured = capsys.readouterr()
    assert f"for the base {hf_base}" in captured.out and "the adapter goes on the float base" in captured.err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_base) and config["r"] == 4
    run = load_checkpoint(out, merge=False, quantized_ok=True).eval()
    want = add_lora(load_checkpoint(hf_base), 4, run.config.lora_alpha, run.config.lora_targets).eval()
    with torch.no_grad():
        for name, m in run.named_modules():
            if isinstance(m, QuantLinear) and m.lora is not None:
                update = want.get_submodule(name).parametrizations.weight[0]
                assert m.lora.lora_B.abs().max() > 0, name  # trained by the PPO step
                update.lora_A.copy_(m.lora.lora_A)
                update.lora_B.copy_(m.lora.lora_B)
        idx = torch.randint(0, 4096, (2, 17))
        got = load_checkpoint(adapter)(idx)
        assert rel(got, want(idx)) < 1e-5
        assert rel(got, run(idx)) > 100 * rel(got, want(idx))  # the quantized run computes another function
