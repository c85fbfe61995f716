"""Knowledge distillation (train/distill.py): the loss against float64 formulas, and `pretrain --teacher` /
`sft --teacher` end to end (shortened): refusals, resume, the logged parts, and that distilling moves the
student to the teacher."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from parity import assert_close_rel, record_step_grads
from tritongpt.cli import main
from tritongpt.errors import UserError
from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPTModel
from tritongpt.train import distill
from tritongpt.train.pretrain import parse_args, pretrain
from tritongpt.train.tokenizer import BPETokenizer, get_tokenizer, save_run_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the loss against float64 formulas -----------------------------------------------------------------
def reference(s, t, y, V, alpha, T, beta):
    """float64, token by token, written from the definitions: (loss, ce, kd) means over y != -100."""
    s, t = s.double(), t.double()
    ces, kds = [], []
    for b in range(y.shape[0]):
        for i in range(y.shape[1]):
            if y[b, i] == -100:
                continue
            ces.append(-torch.log_softmax(s[b, i], -1)[y[b, i]])
            p = torch.softmax(t[b, i, :V] / T, -1)  # teacher
            q = torch.softmax(s[b, i, :V] / T, -1)  # student
            if beta == 0:
                kds.append((p * (p / q).log()).sum())
            elif beta == 1:
                kds.append((q * (q / p).log()).sum())
            else:
                m = beta * p + (1 - beta) * q
                kds.append(beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum())
    ce, kd = torch.stack(ces).mean(), torch.stack(kds).mean()
    return (1 - alpha) * ce + alpha * T * T * kd, ce, kd


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_loss_and_gradients_match_float64_formulas(beta):
    g = torch.Generator().manual_seed(0)
    V = 9  # the tokenizer's ids; the student has 11 columns, the teacher 13 (padded rows differ)
    s = (torch.randn(2, 5, 11, generator=g) * 2).requires_grad_()
    t = torch.randn(2, 5, 13, generator=g) * 3
    y = torch.randint(0, V, (2, 5), generator=g)
    y[0, 1] = y[1, 3] = y[1, 4] = -100
    loss, ce, kd = distill.distill_loss(s, t, y, V, alpha=0.3, temperature=2.0, beta=beta)
    s64 = s.detach().double().requires_grad_()
    want, want_ce, want_kd = reference(s64, t, y, V, 0.3, 2.0, beta)
    for got, w in ((loss, want), (ce, want_ce), (kd, want_kd)):
        assert abs(got.item() - w.item()) < 1e-5 * max(1.0, abs(w.item())), (got, w)
    loss.backward()
    want.backward()
    assert torch.allclose(s.grad.double(), s64.grad, atol=1e-6, rtol=1e-5)
    # masked positions and columns past the tokenizer's ids change nothing
    s2, t2 = s.detach().clone(), t.clone()
    s2[0, 1] += 5.0
    t2[1, 3:] -= 7.0
    t2[..., V:] = torch.randn(2, 5, 13 - V, generator=g) * 9
    assert torch.equal(distill.distill_loss(s2, t2, y, V, 0.3, 2.0, beta)[2], kd.detach())
    # the sum reduction is the mean times the count
    total = distill.distill_loss(s.detach(), t, y, V, 0.3, 2.0, beta, reduction="sum")[0]
    assert math.isclose(total.item(), loss.item() * (y != -100).sum().item(), rel_tol=1e-5)


def test_divergences_are_zero_at_the_teacher_and_positive_elsewhere():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 7, generator=g)
    for beta in (0.0, 0.3, 0.5, 1.0):
        assert distill.divergence(z, z, 1.5, beta).abs().max() < 1e-6
        assert (distill.divergence(z, torch.randn(3, 7, generator=g), 1.5, beta) > 0).all()


# -- models and checkpoints ----------------------------------------------------------------------------
def small(seed, vocab=300, context=128, head_scale=1.0, **kw):
    torch.manual_seed(seed)
    m = GPTModel(GPTConfig(**{"vocab_size": vocab, "context_length": context, "n_embd": 24, "n_layer": 2,
                              "n_head": 2, "dropout": 0.0, **kw}))
    with torch.no_grad():
        m.out_head.weight.mul_(head_scale)  # a peaked teacher: a distribution the data alone would not teach
    return m


def write(model, folder, tok):
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.safetensors", None)
    save_run_tokenizer(tok, folder)
    return str(folder)


@pytest.fixture(scope="module")
def ckpts(corpus, tmp_path_factory):
    tok = get_tokenizer(str(corpus.tok))
    d = tmp_path_factory.mktemp("ckpts")
    from tritongpt.train.data import load_text

    other = BPETokenizer.train(load_text("pydoc")[20000:36000], 300, name="other")  # other merges: other ids
    return SimpleNamespace(
        tok=tok, student=write(small(1), d / "student", tok),
        teacher=write(small(2, vocab=310, n_embd=32, head_scale=5.0), d / "teacher", tok),
        teacher2=write(small(3, vocab=310, head_scale=20.0), d / "teacher2", tok),
        short=write(small(4, context=16), d / "short", tok),
        other=write(small(5), d / "other", other))


def pargs(corpus, ckpts, out, *extra):
    return ["--data", str(corpus.text), "--cache-dir", str(corpus.cache), "--init", ckpts.student,
            "--out-dir", str(out), "--device", "cpu", "--kernels", "reference", "--block-size", "32",
            "--batch-size", "4", "--eval-every", "0", "--sample-tokens", "0", "--log-every", "0",
            "--warmup-steps", "0", "--vocab-multiple", "64", *extra]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_alpha_zero_is_the_plain_loss_and_the_parts_are_logged(corpus, ckpts, tmp_path):
    plain = pretrain(parse_args(pargs(corpus, ckpts, tmp_path / "a", "--max-steps", "3", "--z-loss", "1e-3")))
    zero = pretrain(parse_args(pargs(corpus, ckpts, tmp_path / "b", "--max-steps", "3", "--z-loss", "1e-3",
                                     "--teacher", ckpts.teacher, "--distill-alpha", "0")))
    assert zero["losses"] == plain["losses"]  # bit for bit: 1 * CE + 0 * D
    half = pretrain(parse_args(pargs(corpus, ckpts, tmp_path / "c", "--max-steps", "2", "--teacher", ckpts.teacher,
                                     "--distill-alpha", "0.3", "--distill-temperature", "2")))
    for r in rows(tmp_path / "c"):
        assert math.isclose(r["loss"], 0.7 * r["distill_ce"] + 0.3 * 4 * r["distill_kd"], rel_tol=1e-5)
        assert r["distill_kd"] > 0
    assert half["val_loss"] > 0  # evaluations: the plain CE (the eval_fn is unchanged)
    assert all("distill_ce" not in r for r in rows(tmp_path / "a"))


def reference_and_fused(corpus, ckpts, tmp_path, extra, monkeypatch):
    """pretrain with extra on the reference path (out dir ref) and with --kernels cross_entropy (fused): the same
    losses and first step's gradients to fp32 rounding, asserted; (reference result, fused result)."""
    grads = record_step_grads(monkeypatch)
    ref = pretrain(parse_args(pargs(corpus, ckpts, tmp_path / "ref", *extra)))
    steps = len(grads)
    argv = pargs(corpus, ckpts, tmp_path / "fused", *extra)
    argv[argv.index("--kernels") + 1] = "cross_entropy"
    fused = pretrain(parse_args(argv))
    assert fused["losses"] == pytest.approx(ref["losses"], rel=1e-4)
    # Adam's step is nearly blind to a gradient's scale (the fused KD gradient 1% off moved neither the losses nor
    # distill_kd by 1e-4), so the first step's gradients, from the same weights and batch, tensor by tensor: 2e-5
    # (measured <= 4e-7; that KD gradient: up to 1.3e-4, the KD term a small part of the gradient at alpha 0.4)
    assert len(grads) == 2 * steps and len(grads[0]) == len(grads[steps])
    for i, ((_, got), (_, want)) in enumerate(zip(grads[steps], grads[0])):
        if want.abs().max() < 1e-6:  # W_key's bias: 0 in exact arithmetic (a shift its softmax ignores), noise only
            assert got.abs().max() < 1e-6, (i, got.abs().max())
        else:
            assert_close_rel(got, want, 2e-5, f"first step's gradient {i} {tuple(want.shape)}")
    return ref, fused


def test_the_triton_loss_path_distills_as_the_reference_does(corpus, ckpts, tmp_path, monkeypatch):
    # --kernels cross_entropy: the loss is kernels/jsd.py's linear_distill_loss (both heads fused, no logits), the
    # teacher wider and with another padded head; the same steps as the reference path's, to fp32 rounding
    extra = ("--max-steps", "2", "--teacher", ckpts.teacher, "--distill-alpha", "0.4", "--distill-temperature", "2",
             "--distill-beta", "0.3")
    ref, fused = reference_and_fused(corpus, ckpts, tmp_path, extra, monkeypatch)
    for a, b in zip(rows(tmp_path / "ref"), rows(tmp_path / "fused")):
        assert b["distill_kd"] == pytest.approx(a["distill_kd"], rel=1e-4) and b["distill_kd"] > 0


def held_out_kl(model, teacher, tok, text, V):
    x = torch.tensor([tok.encode(text)[:32 * 8]]).view(8, 32)
    with torch.no_grad():
        return distill.divergence(model(x)[..., :V], teacher(x)[..., :V]).mean().item()


def test_distilling_moves_the_student_to_the_teacher(corpus, ckpts, tmp_path, capsys):
    from tritongpt.train.gpt2_weights import load_checkpoint

    teacher, text = load_checkpoint(ckpts.teacher), corpus.text.read_text()[-3000:]
    V = ckpts.tok.vocab_size
    before = held_out_kl(load_checkpoint(ckpts.student), teacher, ckpts.tok, text, V)
    after = {}
    for name, extra in (("plain", []), ("kd", ["--teacher", ckpts.teacher, "--distill-alpha", "1"])):
        pretrain(parse_args(pargs(corpus, ckpts, tmp_path / name, "--max-steps", "30", "--lr", "1e-2", *extra)))
        after[name] = held_out_kl(load_checkpoint(tmp_path / name), teacher, ckpts.tok, text, V)
    with capsys.disabled():
        print(f"\nKL(teacher || student) on held-out text: start {before:.3f}, 30 steps of CE {after['plain']:.3f}, "
              f"30 steps distilled (alpha 1) {after['kd']:.3f}")
    # the data alone take the student away from this teacher; the teacher's targets bring it close
    assert after["kd"] < 0.5 * before and after["kd"] < 0.1 * after["plain"]


# -- document masking and packing reach the teacher; SFT counts the response tokens only ---------------
class Spy(torch.nn.Module):
    """A teacher that returns given logits and records what it was called with."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.calls = logits, []

    def forward(self, x, doc_ids=None):
        self.calls.append(doc_ids)
        return self.logits


def test_sft_distills_the_counted_tokens_only_and_packing_reaches_the_teacher():
    g = torch.Generator().manual_seed(0)
    model = small(1, vocab=40, context=16)
    x = torch.randint(0, 40, (2, 8), generator=g)
    y = torch.randint(0, 40, (2, 8), generator=g)
    y[:, :3] = -100  # the prompt
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]] * 2)
    logits = torch.randn(2, 8, 40, generator=g)
    opts = {"distill_alpha": 0.5, "distill_temperature": 1.0, "distill_beta": 0.0}
    spy = Spy(logits)
    fn = distill.sft_loss_fn(spy, opts, 40, -100)
    loss, n = fn(model, (x, y, doc))
    assert spy.calls[0] is doc and n.item() == 10
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    changed = logits.clone()
    changed[:, :3] = torch.randn(2, 3, 40, generator=g) * 10  # the teacher's logits at prompt positions
    loss2, _ = distill.sft_loss_fn(Spy(changed), opts, 40, -100)(model, (x, y, doc))
    loss2.backward()
    assert loss2.item() == loss.item()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    # the teacher's logits at a response position do change it
    changed[:, 5] += torch.randn(40, generator=g)
    assert distill.sft_loss_fn(Spy(changed), opts, 40, -100)(model, (x, y, doc))[0].item() != loss.item()
    # pretrain: --document-mask's ids go to the teacher too
    spy = Spy(logits)
    distill.pretrain_loss_fn(spy, opts, 40, lambda _: doc)(model, (x, y.clamp_min(0)))
    assert spy.calls[0] is doc


def sft_argv(ckpts, out, *extra):
    data = out.parent / "says.jsonl"  # short records: the tasks' template is long in a 300-token BPE
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}) + "\n"
                            for w in ("hi", "yes", "no", "ok", "up", "go", "on", "in", "at", "to") * 2))
    return ["sft", "--init", ckpts.student, "--data", str(data), "--out-dir", str(out), "--batch-size", "4",
            "--eval-every", "0", "--eval-gen", "0", "--sample-every", "0", "--max-new-tokens", "4",
            "--device", "cpu", "--kernels", "reference", "--log-every", "0", *extra]


def test_sft_with_a_teacher_runs_logs_and_records(ckpts, tmp_path):
    out = tmp_path / "sft"
    assert main(sft_argv(ckpts, out, "--max-steps", "2", "--teacher", ckpts.teacher, "--distill-beta", "0.5",
                         "--distill-alpha", "0.25", "--packing")) == 0
    r = rows(out)
    steps = [x for x in r if "distill_kd" in x]
    assert len(steps) == 2 and all(math.isclose(x["loss"], 0.75 * x["distill_ce"] + 0.25 * x["distill_kd"],
                                                rel_tol=1e-5) for x in steps)
    from tritongpt.train import common

    state = common.load_state(common.resume_checkpoint(out, "latest"))
    assert state["args"]["distill_beta"] == 0.5 and state["args"]["teacher"] == ckpts.teacher
    assert "teacher_fingerprint" in state["data"][0]


# -- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,said", [
    (["--distill-alpha", "0.2"], "--distill-alpha sets how --teacher's distillation mixes in: without --teacher"),
    (["--distill-temperature", "2", "--distill-beta", "1"], "--distill-temperature, --distill-beta set how"),
    (["--teacher", "T", "--distill-alpha", "1.5"], "--distill-alpha must be in [0, 1], got 1.5"),
    (["--teacher", "T", "--distill-alpha", "nan"], "--distill-alpha must be in [0, 1], got nan"),
    (["--teacher", "T", "--distill-alpha", "-0.1"], "--distill-alpha must be in [0, 1], got -0.1"),
    (["--teacher", "T", "--distill-temperature", "0"], "--distill-temperature must be a finite number > 0, got 0"),
    (["--teacher", "T", "--distill-temperature", "inf"], "--distill-temperature must be a finite number > 0"),
    (["--teacher", "T", "--distill-beta", "1.01"], "--distill-beta must be in [0, 1], got 1.01"),
    (["--teacher", "T", "--distill-beta", "-1"], "--distill-beta must be in [0, 1], got -1"),
])
def test_the_options_out_of_range_or_without_a_teacher_are_refused_by_name(flags, said):
    with pytest.raises(UserError) as e:
        distill.distill_options(parse_args(flags))
    assert said in str(e.value)


def test_refusals_from_the_command_line(corpus, ckpts, tmp_path, capsys):
    cases = [
        (["--teacher", ckpts.other], f"--teacher {ckpts.other}'s tokenizer (other) is not the student's "
                                     f"(--init {ckpts.student}: small)"),
        (["--teacher", ckpts.short], f"--teacher {ckpts.short}'s context length 16 is shorter than the training "
                                     "block of 32 tokens"),
        (["--teacher", str(tmp_path / "nothing")], "no checkpoint there"),
        (["--teacher", "tiny"], "--teacher tiny: no checkpoint there"),
        (["--distill-beta", "0.5"], "--distill-beta sets how --teacher's distillation mixes in"),
    ]
    for extra, said in cases:
        assert main(["pretrain", *pargs(corpus, ckpts, tmp_path / "bad", "--max-steps", "1", *extra)]) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
    for extra, said in cases[:2] + cases[-1:]:
        assert main(sft_argv(ckpts, tmp_path / "bad", "--max-steps", "1", "--max-length", "32", *extra)) == 2
        assert said.replace("training block of 32 tokens", "training block of") in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


# -- resume ---------------------------------------------------------------------------------------------
def test_a_resume_names_a_changed_alpha_and_refuses_another_teacher(corpus, ckpts, tmp_path, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(ckpts.teacher, teacher)
    out = tmp_path / "run"
    base = pargs(corpus, ckpts, out, "--teacher", str(teacher))
    assert main(["pretrain", *base, "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["pretrain", *base, "--max-steps", "2", "--resume", "--distill-alpha", "0.3"]) == 0
    assert "--max-steps 2 (the run had 1), --distill-alpha 0.3 (0.5)" in capsys.readouterr().err
    # the run without a teacher had the defaults recorded: adding one is named
    plain = pargs(corpus, ckpts, tmp_path / "plain")
    assert main(["pretrain", *plain, "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["pretrain", *plain, "--max-steps", "2", "--resume", "--teacher", str(teacher)]) == 0
    assert f"--teacher {teacher} (None)" in capsys.readouterr().err
    # other weights at the teacher's path: refused
    shutil.copy(ckpts.teacher2 + "/model.safetensors", teacher / "model.safetensors")
    assert main(["pretrain", *base, "--max-steps", "3", "--resume"]) == 2
    assert f"--teacher {teacher} is not the model this run distilled from" in capsys.readouterr().err


def test_place_teacher_names_the_teacher_and_closes_the_trainer_on_a_refusal():
    """A teacher whose shape the trainer's kernels refuse: the error says --teacher, and the trainer's process
    group is torn down (as a refusal of the data does), not left behind."""
    closed = []
    trainer = SimpleNamespace(device="cpu", args=SimpleNamespace(kernels="triton"), close=lambda: closed.append(1))

    def refuse(kernels):
        raise UserError("this model's head_dim 7 is not one the Triton attention takes")

    teacher = GPTModel(GPTConfig(vocab_size=32, context_length=8, n_embd=8, n_layer=1, n_head=1))
    teacher.set_kernels = refuse
    with pytest.raises(UserError, match="^--teacher: this model's head_dim 7"):
        distill.place_teacher(teacher, trainer)
    assert closed == [1]


def test_a_mixture_of_experts_student_keeps_its_load_balancing_loss():
    """An MoE student's distillation loss has its routers' load-balancing term, moe_aux_loss times it, as
    forward(targets=) adds it to the mean loss; outside the (1 - A) CE + A T^2 D mix."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, context_length=16, n_embd=16, n_layer=1, n_head=2, position_encoding="rope",
               norm="rmsnorm", mlp="swiglu", bias=False)
    student = GPTModel(GPTConfig(**cfg, n_experts=4, experts_per_token=2, moe_aux_loss=0.25))
    teacher = GPTModel(GPTConfig(**cfg))
    x, y = torch.randint(0, 40, (2, 11)), torch.randint(0, 40, (2, 11))
    opts = {"distill_alpha": 0.4, "distill_temperature": 1.5, "distill_beta": 0.0}
    got = distill.pretrain_loss_fn(teacher, opts, 37, lambda x: None)(student, (x, y))
    with torch.no_grad():
        t_logits = teacher(x)
    mixed, _, _ = distill.distill_loss(student(x), t_logits, y, 37, 0.4, 1.5, 0.0)
    aux = student.router_aux_loss()
    assert aux > 0 and torch.allclose(got, mixed + 0.25 * aux, rtol=1e-6, atol=1e-7)


# -- a quantized teacher (--teacher-quantize, or a file `tritongpt quantize` wrote) ----------------------------
def test_a_quantized_teacher_gives_the_targets_of_its_quantized_weights_flag_or_file(corpus, ckpts, tmp_path,
                                                                                      capsys):
    """--teacher-quantize int4 --teacher-group-size 32 distills from the int4 model, the same one `tritongpt quantize
    --quantize int4 --group-size 32` writes: bit for bit the same steps as --teacher on that file, other steps than
    the float teacher's; the run records what it was given; the file given --teacher-quantize int4 has nothing to do."""
    from tritongpt.train import common

    q4 = tmp_path / "q4"
    assert main(["quantize", ckpts.teacher, "--out", str(q4), "--quantize", "int4", "--group-size", "32"]) == 0
    capsys.readouterr()
    runs = {}
    for name, extra in (("flag", ("--teacher", ckpts.teacher, "--teacher-quantize", "int4", "--teacher-group-size",
                                  "32")),
                        ("file", ("--teacher", str(q4))),
                        ("float", ("--teacher", ckpts.teacher))):
        runs[name] = pretrain(parse_args(pargs(corpus, ckpts, tmp_path / name, "--max-steps", "2", *extra)))
        assert all(r["distill_kd"] > 0 for r in rows(tmp_path / name) if "distill_kd" in r)
    assert "int4 (group 32) weight-only (--teacher " in capsys.readouterr().err
    assert runs["flag"]["losses"] == runs["file"]["losses"]
    assert runs["flag"]["losses"] != runs["float"]["losses"]
    state = common.load_state(common.resume_checkpoint(tmp_path / "flag", "latest"))
    assert (state["args"]["teacher_quantize"], state["args"]["teacher_group_size"]) == ("int4", 32)
    state = common.load_state(common.resume_checkpoint(tmp_path / "float", "latest"))
    assert (state["args"]["teacher_quantize"], state["args"]["teacher_group_size"]) == (None, None)
    assert main(["pretrain", *pargs(corpus, ckpts, tmp_path / "again", "--max-steps", "1", "--teacher", str(q4),
                                    "--teacher-quantize", "int4")]) == 0
    assert f"--teacher {q4} is int4 already (saved so)" in capsys.readouterr().err


def test_the_fused_loss_distills_from_an_int8_teacher_as_the_reference_does(corpus, ckpts, tmp_path,
                                                                             monkeypatch):
    """--kernels cross_entropy with a quantized teacher: linear_distill_loss takes its head dequantized (the matrix its
    own forward multiplies by), so the fused steps are the reference path's, to fp32 rounding."""
    extra = ("--max-steps", "2", "--teacher", ckpts.teacher, "--teacher-quantize", "int8", "--distill-alpha", "0.4",
             "--distill-beta", "0.3")
    ref, _ = reference_and_fused(corpus, ckpts, tmp_path, extra, monkeypatch)
    float_teacher = pretrain(parse_args(pargs(corpus, ckpts, tmp_path / "float", *extra[:4], *extra[6:])))
    assert float_teacher["losses"] != ref["losses"]


def test_sft_distills_from_a_quantized_teacher_and_a_resume_refuses_another_quantization(ckpts, tmp_path, capsys):
    """sft --teacher on an int8 file (refused by name before: it only runs forward); the teacher's fingerprint covers
    its quantized matrices (buffers, not parameters), so resuming with the int4 teacher at the same path, whose
    parameters (embeddings, norms) and biases are the int8 one's, is refused."""
    teacher = tmp_path / "teacher"
    assert main(["quantize", ckpts.teacher, "--out", str(teacher)]) == 0
    out = tmp_path / "sft"
    assert main(sft_argv(ckpts, out, "--max-steps", "1", "--teacher", str(teacher))) == 0
    assert [x["distill_kd"] > 0 for x in rows(out) if "distill_kd" in x] == [True]
    capsys.readouterr()
    assert main(["quantize", ckpts.teacher, "--out", str(teacher), "--quantize", "int4", "--group-size", "32",
                 "--overwrite"]) == 0
    assert main(sft_argv(ckpts, out, "--max-steps", "2", "--teacher", str(teacher), "--resume")) == 2
    assert f"--teacher {teacher} is not the model this run distilled from" in capsys.readouterr().err


@pytest.mark.parametrize("flags,said", [
    (["--teacher-quantize", "int8"], "--teacher-quantize sets how --teacher's distillation mixes in: without"),
    (["--teacher", "T", "--teacher-group-size", "32"], "--teacher-group-size sets an int4 teacher's groups: pass "
                                                      "--teacher-quantize int4 too"),
    (["--teacher", "T", "--teacher-quantize", "int8", "--teacher-group-size", "32"], "--teacher-group-size sets an "
                                                                                     "int4 teacher's groups"),
])
def test_the_teacher_quantization_flags_are_refused_where_they_do_nothing(flags, said):
    with pytest.raises(UserError) as e:
        distill.distill_options(parse_args(flags))
    assert said in str(e.value)


def test_a_resume_with_another_teacher_quantization_is_refused_naming_it(corpus, ckpts, tmp_path, capsys):
    """The same --teacher file run another way (--teacher-quantize, --teacher-group-size) gives other targets: the
    refusal says how the run's teacher ran and how this one does, not only that the weights differ."""
    out = tmp_path / "run"
    quant = ("--teacher", ckpts.teacher, "--teacher-quantize", "int4", "--teacher-group-size", "16")
    assert main(["pretrain", *pargs(corpus, ckpts, out, "--max-steps", "1", *quant)]) == 0
    for extra, now in ((("--teacher-quantize", "int8"), "int8"), ((), "float"),
                       (("--teacher-quantize", "int4", "--teacher-group-size", "32"), "int4 (group 32)")):
        capsys.readouterr()
        argv = pargs(corpus, ckpts, out, "--max-steps", "2", "--resume", "latest", "--teacher", ckpts.teacher, *extra)
        assert main(["pretrain", *argv]) == 2
        error = capsys.readouterr().err.split("error: ")[-1]
        assert f"the run's ran int4 (group 16), this one {now}" in error and "--teacher-quantize" in error
    assert main(["pretrain", *pargs(corpus, ckpts, out, "--max-steps", "2", "--resume", "latest", *quant)]) == 0


def test_the_fused_loss_reads_a_quantized_heads_dequantized_weight_in_the_hidden_states_dtype(monkeypatch):
    """A teacher cast to bf16 (no autocast): its quantized head dequantized in bf16, the float head's dtype there (an
    fp32 one would meet bf16 hidden states: refused by the kernel's dtype check); under autocast, autocast's."""
    from tritongpt.model.quant import quantize

    torch.manual_seed(0)
    cfg = dict(vocab_size=40, context_length=16, n_embd=32, n_layer=1, n_head=2)
    student, teacher = GPTModel(GPTConfig(**cfg)), quantize(GPTModel(GPTConfig(**cfg)), "int8")
    student.set_kernels({"cross_entropy"})
    x, y = torch.randint(0, 40, (2, 9)), torch.randint(0, 40, (2, 9))
    seen = []
    real = distill.head_weight
    monkeypatch.setattr(distill, "head_weight", lambda m, dtype=None: seen.append(dtype) or real(m, dtype))
    for model in (student, teacher):
        model.to(torch.bfloat16)
    loss, _, kd = distill.fused_distill_loss(student, teacher, x, y, None, 40, 0.5, 1.0, 0.0)
    assert seen == [torch.bfloat16] and torch.isfinite(loss) and kd > 0
    with torch.no_grad():
        want = distill.distill_loss(student(x).float(), teacher(x).float(), y, 40, 0.5, 1.0, 0.0)[0]
    assert abs(loss.item() - want.item()) < 2e-2 * want.item()
