"""GKD's on-policy distillation in `sft --teacher` (train/distill.py's OnPolicy, --distill-lmbda, --distill-seq-kd):
the batch the loss sees against an independent decoding loop (no KV cache) with the same seeded draws, the loss on
the student's own answers against a float64 JSD, the refusals, and the command end to end with its resume."""
import math

import pytest
import torch

from parity import assert_close_rel, record_step_grads
from tritongpt.cli import main
from tritongpt.errors import UserError
from tritongpt.train import distill
from tritongpt.train.pretrain import parse_args
from tritongpt.train.sft import Example, SFTData

from test_distill import rows, sft_argv, small

pytestmark = pytest.mark.usefixtures("one_thread")

V, END, PAD = 37, 3, 5  # the tokenizer's ids (the models have 40), what ends an answer, the batches' padding


def opts(lmbda=1.0, seq_kd=False, temperature=1.0, max_new=6, alpha=0.5, beta=0.0):
    return {"distill_alpha": alpha, "distill_temperature": 1.0, "distill_beta": beta, "distill_lmbda": lmbda,
            "distill_seq_kd": seq_kd, "distill_gen_temperature": temperature, "distill_max_new_tokens": max_new}


def examples(seed, n=10, max_len=16):
    """Random examples (fresh ids, never the END) of prompts of 2 to 5 tokens (several share a length)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, a = int(torch.randint(2, 6, (), generator=g)), int(torch.randint(1, 6, (), generator=g))
        ids = torch.randint(6, V, (p + a,), generator=g).tolist() + [END]
        out.append(Example(ids[:max_len + 1], p))
    return out


def setup(o, seed=0, student_seed=1, max_len=16):
    data = SFTData(examples(seed, max_len=max_len), [], PAD, batch_size=4, seed=seed, rank=0, world_size=1)
    student, teacher = small(student_seed, vocab=40, context=32), small(2, vocab=40, context=32, head_scale=3.0)
    student.train()
    teacher.eval()
    return data, student, teacher, distill.OnPolicy(data, student, teacher, o, END, V, max_len=max_len, seed=seed)


def decode(model, prompts, budget, temperature, generator):
    """What OnPolicy's answers must be, written apart from generate(): a whole forward a token (no cache), the
    tokenizer's ids only, greedy or one inverse-CDF draw a step for the rows together (as generate draws),
    finished rows going on with END until all are."""
    x, done = prompts.clone(), torch.zeros(len(prompts), dtype=torch.bool)
    was = model.training
    with torch.no_grad():
        for _ in range(budget):
            logits = model.eval()(x)[:, -1, :V].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, -1)
                # inverse CDF at one uniform a row: the first token whose cumulative probability passes it
                u = torch.rand(len(x), generator=generator)
                nxt = (probs.cumsum(-1) <= (u * probs.sum(-1))[:, None]).sum(-1).clamp(max=V - 1)
            nxt = torch.where(done, END, nxt)
            done |= nxt == END
            x = torch.cat([x, nxt[:, None]], 1)
            if done.all():
                break
    model.train(was)
    return x[:, prompts.size(1):].tolist()


def expected(model, batch, o, generator, max_len=16):
    """The batch's examples with their answers replaced as OnPolicy should: (prompt, answer) per row."""
    cuts = [e.prompt_len for e in batch]
    out = [None] * len(batch)
    for cut in sorted(set(cuts)):
        rows_ = [i for i, c in enumerate(cuts) if c == cut]
        new = decode(model, torch.tensor([batch[i].ids[:cut] for i in rows_]),
                     min(o["distill_max_new_tokens"], max_len + 1 - cut), o["distill_gen_temperature"], generator)
        for i, ids in zip(rows_, new):
            out[i] = (batch[i].ids[:cut], ids[:ids.index(END) + 1] if END in ids else ids)
    return out


def same_batch(a, b):
    """Two batches alike, element by element (an unpacked batch's doc_ids None in both)."""
    return len(a) == len(b) and all(x is y if x is None or y is None else torch.equal(x, y) for x, y in zip(a, b))


def check_batch(batch, want):
    """inputs = prompt + answer (shifted), targets -100 over the prompt, the answer's tokens, -100 after its
    END; padding PAD; each row's real tokens (lengths, the last) its prompt and answer's, shifted."""
    inputs, targets, doc_ids, lengths = batch
    assert doc_ids is None and lengths.tolist() == [len(p) + len(a) - 1 for p, a in want]
    for r, (prompt, answer) in enumerate(want):
        seq = prompt + answer
        L = len(seq) - 1
        assert inputs[r, :L].tolist() == seq[:-1] and (inputs[r, L:] == PAD).all()
        assert (targets[r, :len(prompt) - 1] == -100).all()
        assert targets[r, len(prompt) - 1:L].tolist() == answer
        assert (targets[r, L:] == -100).all()


# -- the batches --------------------------------------------------------------------------------------
def test_lmbda_one_answers_every_batch_with_the_students_samples_from_the_seeded_generator():
    o = opts(lmbda=1.0, temperature=1.3, max_new=5)
    data, student, teacher, op = setup(o, max_len=7)  # prompt + answer within 8 tokens: budgets 3 to 5
    plain = SFTData(examples(0, max_len=7), [], PAD, batch_size=4, seed=0, rank=0, world_size=1)
    caches = []
    new_cache = student.new_cache
    student.new_cache = lambda *a: caches.append(a) or new_cache(*a)  # generation goes through the KV cache
    g = torch.Generator().manual_seed(op.seed)
    lengths = set()
    for _ in range(9):  # (enough batches for an answer the END ends)
        batch = op.get_batch("train")
        assert op.source() == "student" and student.training  # given back in train mode
        torch.rand((), generator=g)  # the lmbda draw comes first, from the same generator as the samples
        want = expected(student, plain.next_examples(), o, g, max_len=7)
        check_batch(batch, want)
        lengths |= {(len(p), len(a), a[-1] == END) for p, a in want}
    assert caches
    # answers ended by the END, and cut at the budget: max_len + 1 - the prompt, or the max_new_tokens
    assert any(end for _, _, end in lengths) and any(p + a == 8 and not end for p, a, end in lengths)
    assert any(p == 2 and a == 5 and not end for p, a, end in lengths)
    # the loss sees it too: a run's Trainer gets op.get_batch (below, end to end)


def test_lmbda_zero_never_generates_and_a_fraction_follows_the_seeded_draw():
    data, student, teacher, op = setup(opts(lmbda=0.0))
    plain = SFTData(examples(0), [], PAD, batch_size=4, seed=0, rank=0, world_size=1)
    for _ in range(5):
        got, want = op.get_batch("train"), plain.get_batch("train")
        assert op.source() == "data" and same_batch(got, want)
    # lmbda 0.5, greedy (the samples draw nothing from the generator): one uniform draw a batch, < 0.5 student's
    sources = {}
    for seed in (0, 1):
        o = opts(lmbda=0.5, temperature=0.0, max_new=3)
        data, student, teacher, op = setup(o, seed=seed)
        plain = SFTData(examples(seed), [], PAD, batch_size=4, seed=seed, rank=0, world_size=1)
        g = torch.Generator().manual_seed(op.seed)
        sources[seed] = []
        for _ in range(10):
            batch, ex = op.get_batch("train"), plain.next_examples()
            student_turn = torch.rand((), generator=g).item() < 0.5
            assert op.source() == ("student" if student_turn else "data")
            if student_turn:
                check_batch(batch, expected(student, ex, o, None))
            else:
                assert same_batch(batch, plain.collate_train(ex))
            sources[seed].append(op.source())
        assert 0 < sources[seed].count("student") < 10
    assert sources[0] != sources[1]  # the draw is the seed's


def test_seq_kd_answers_with_the_teacher_first_and_lmbda_then_with_the_student():
    o = opts(lmbda=0.0, seq_kd=True, temperature=0.0, max_new=5)
    data, student, teacher, op = setup(o)
    plain = SFTData(examples(0), [], PAD, batch_size=4, seed=0, rank=0, world_size=1)
    for _ in range(3):
        batch = op.get_batch("train")
        assert op.source() == "teacher" and not teacher.training
        check_batch(batch, expected(teacher, plain.next_examples(), o, None))
    # both: the student's answers (to the same prompts) replace the teacher's, as TRL orders them
    o = opts(lmbda=1.0, seq_kd=True, temperature=0.0, max_new=5)
    data, student, teacher, op = setup(o)
    plain = SFTData(examples(0), [], PAD, batch_size=4, seed=0, rank=0, world_size=1)
    batch = op.get_batch("train")
    ex = plain.next_examples()
    assert op.source() == "student"
    check_batch(batch, expected(student, ex, o, None))
    assert expected(student, ex, o, None) != expected(teacher, ex, o, None)


def test_a_chats_earlier_turns_are_its_prompt_and_a_generator_state_resumes():
    # prompt, answer 1 (learned), user turn 2 (context), answer 2: the answer generated is the last one
    e = Example([7, 8, 9, 10, END, 11, 12, 13, 14, END], 3, ((5, 7),))
    assert distill.prompt_end(e) == 7
    assert distill.prompt_end(Example([7, 8, 9, 10, END, 11], 3, ((5, 6),))) == 3  # a template's tail: not
    data = SFTData([e] * 4, [], PAD, batch_size=2, seed=0, rank=0, world_size=1)
    op = distill.OnPolicy(data, small(1, vocab=40, context=32), small(2, vocab=40, context=32),
                          opts(max_new=4), END, V, max_len=16)
    inputs, targets = op.get_batch("train")[:2]
    assert inputs[0, :7].tolist() == e.ids[:7] and (targets[0, :6] == -100).all() and (targets[0, 6:] != -100).any()
    state = op.state_dict()
    after = [op.get_batch("train") for _ in range(2)]
    op.load_state_dict(state)
    again = [op.get_batch("train") for _ in range(2)]
    assert all(same_batch(x, y) for x, y in zip(after, again))
    # a state from another device type's generator (a CUDA state is not a CPU one's 5056 bytes): fresh draws
    # from the seed, said, not a crash at the resume
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        op.load_state_dict({**state, "gkd_generator": torch.zeros(16, dtype=torch.uint8)})
    assert "draws afresh from --seed" in out.getvalue()
    fresh = torch.Generator().manual_seed(op.seed).get_state()
    assert torch.equal(op.generator.get_state(), fresh)


# -- the loss ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_the_loss_on_the_students_answers_is_alpha_t2_jsd_over_them_in_float64(beta):
    o = {**opts(lmbda=1.0, temperature=1.0, alpha=0.3, beta=beta), "distill_temperature": 1.7}
    data, student, teacher, op = setup(o, seed=3)
    parts = distill.Parts(on_policy=True)
    fn = distill.sft_loss_fn(teacher, o, V, -100, parts, op.source)
    inputs, targets = op.get_batch("train")[:2]
    loss, n = fn(student, (inputs, targets))
    with torch.no_grad():
        s, t = student(inputs).double(), teacher(inputs).double()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(targets.size(0)):
        for i in range(targets.size(1)):
            if targets[b, i] == -100:
                continue
            count += 1
            q = torch.softmax(s[b, i, :V] / 1.7, -1)  # student
            p = torch.softmax(t[b, i, :V] / 1.7, -1)  # teacher
            m = beta * p + (1 - beta) * q
            kl_p = (p * (p / m).log()).sum() if beta > 0 else (p * (p / q).log()).sum()
            kl_q = (q * (q / m).log()).sum() if beta < 1 else (q * (q / p).log()).sum()
            total += kl_p if beta == 0 else kl_q if beta == 1 else beta * kl_p + (1 - beta) * kl_q
    want = 0.3 * 1.7 ** 2 * total
    assert n.item() == count > 0
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5)
    row = parts.pop()
    assert math.isclose(row["distill_kd"], total.item() / count, rel_tol=1e-5)
    assert "distill_ce" not in row and row["distill_on_policy"] == 1
    # the same batch as data: the CE comes back in
    data_loss, _ = distill.sft_loss_fn(teacher, o, V, -100, parts)(student, (inputs, targets))
    assert data_loss.item() > loss.item() * 1.5 and parts.pop()["distill_on_policy"] == 0



def test_a_trainer_step_on_the_students_answers_is_float64s_on_both_paths(tmp_path, monkeypatch):
    """One Trainer step at --distill-lmbda 1 on each path (the Triton one: the student's answers drawn through its
    kernels, the loss kernels/jsd.py's linear_distill_loss, both heads padded past V), its loss's gradients held to
    a float64 student's on the same batch: 1e-4 relative, tensor by tensor (measured <= 1.7e-6 on both paths)."""
    from tritongpt.train.loop import TrainArgs, Trainer

    o = {**opts(lmbda=1.0, temperature=1.0, alpha=0.3, beta=0.4, max_new=3), "distill_temperature": 1.7}
    steps, batches, first = record_step_grads(monkeypatch), [], {}

    def models():  # head_dim 32: a size the Triton attention kernel takes
        return [small(seed, vocab=40, context=32, head_scale=scale, n_embd=32, n_head=1, n_layer=1)
                for seed, scale in ((1, 1.0), (2, 3.0))]
    for kernels in ("reference", "triton"):
        data = SFTData(examples(3, n=4), [], PAD, batch_size=4, seed=3, rank=0, world_size=1)
        student, teacher = models()
        op = distill.OnPolicy(data, student, teacher, o, END, V, max_len=16, seed=3)

        def get_batch(split, generator=None, _get=op.get_batch, _op=op):
            batches.append(_get(split, generator))
            assert _op.source() == "student"
            return batches[-1]
        args = TrainArgs(out_dir=str(tmp_path / kernels), max_steps=1, batch_size=4, lr=1e-3, warmup_steps=0,
                         eval_every=0, ckpt_every=0, log_every=0, weight_decay=0.0, device="cpu", kernels=kernels,
                         seed=0, dtype="fp32")
        trainer = Trainer(student, args, distill.sft_loss_fn(teacher, o, V, -100, None, op.source), get_batch,
                          name="sft")
        distill.place_teacher(teacher, trainer)
        op.place(trainer.device, trainer.dtype)
        trainer.fit()
        assert distill.fused_head(student, teacher, {}) == (kernels == "triton")
        names = {p: n for n, p in student.named_parameters()}
        first[kernels] = {names[p]: g for p, g in steps[-1]}
    assert len(steps) == 2 and same_batch(batches[0], batches[1]), "the paths drew other answers"
    want, teacher = (m.double() for m in models())
    loss, n = distill.sft_loss_fn(teacher, o, V, -100, None, lambda: "student")(want, batches[0])
    (loss / n).backward()
    for name, p in want.named_parameters():
        for kernels, grads in first.items():
            if p.grad.abs().max() < 1e-6:  # W_key's bias: 0 in exact arithmetic (a shift its softmax ignores)
                assert grads[name].abs().max() < 1e-6, (kernels, name)
            else:
                assert_close_rel(grads[name], p.grad, 1e-4, f"{kernels} first step's {name}.grad")

# -- refusals -----------------------------------------------------------------------------------------------
def sft_parse(argv):
    import argparse

    from tritongpt.train import sft

    sub = argparse.ArgumentParser().add_subparsers()
    sft.add_cli(sub)
    return sub.choices["sft"].parse_args(["--init", "x", *argv])


@pytest.mark.parametrize("flags,said", [
    (["--distill-lmbda", "0.5"], "--distill-lmbda sets how --teacher's distillation mixes in: without --teacher"),
    (["--distill-seq-kd", "--distill-max-new-tokens", "3"], "--distill-seq-kd, --distill-max-new-tokens set how"),
    (["--teacher", "T", "--distill-lmbda", "1.5"], "--distill-lmbda must be in [0, 1], got 1.5"),
    (["--teacher", "T", "--distill-lmbda", "nan"], "--distill-lmbda must be in [0, 1], got nan"),
    (["--teacher", "T", "--distill-lmbda", "0.5", "--distill-alpha", "0"], "--distill-alpha 0: a batch of"),
    (["--teacher", "T", "--distill-gen-temperature", "0.5"],
     "--distill-gen-temperature sets how answers are generated: without --distill-lmbda > 0 or --distill-seq-kd"),
    (["--teacher", "T", "--distill-lmbda", "0", "--distill-max-new-tokens", "9"], "--distill-max-new-tokens sets"),
    (["--teacher", "T", "--distill-seq-kd", "--distill-gen-temperature", "-1"],
     "--distill-gen-temperature must be a finite number >= 0 (0 = greedy), got -1"),
    (["--teacher", "T", "--distill-lmbda", "1", "--distill-max-new-tokens", "0"],
     "--distill-max-new-tokens must be positive, got 0"),
])
def test_the_options_are_refused_by_name(flags, said):
    with pytest.raises(UserError) as e:
        distill.distill_options(sft_parse(flags), prompts=True)
    assert said in str(e.value)


def test_pretrain_refuses_them_and_sft_records_them():
    for flags, names in ((["--distill-lmbda", "0.5"], "--distill-lmbda"),
                         (["--teacher", "T", "--distill-seq-kd", "--distill-gen-temperature", "0"],
                          "--distill-seq-kd, --distill-gen-temperature")):
        with pytest.raises(UserError, match=f"^{names}: on-policy distillation generates answers to prompts"):
            distill.distill_options(parse_args(flags))
    got = distill.distill_options(sft_parse(["--teacher", "T", "--distill-lmbda", "0.25"]), prompts=True)
    assert {k: got[k] for k in distill.GKD_FLAGS} == {"distill_lmbda": 0.25, "distill_seq_kd": False,
                                                      "distill_gen_temperature": 0.9, "distill_max_new_tokens": 128}
    assert {k: v for k, v in distill.distill_options(sft_parse([]), prompts=True).items()
            if k in distill.GKD_FLAGS} == {k: distill.RUN_DEFAULTS[k] for k in distill.GKD_FLAGS}
    with pytest.raises(UserError, match="empty prompt"):
        distill.OnPolicy(SFTData([Example([1, 2, END], 0)], [], PAD, 1, rank=0, world_size=1), None, None,
                         opts(), END, V, 16)


# -- the command ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_ckpts(tmp_path_factory):
    """A student and a teacher with a BPE of the embedded tasks' text (their template ~19 tokens, not ~150)."""
    from types import SimpleNamespace

    from test_distill import write
    from test_sft import small_bpe
    from tritongpt.train import tasks

    tok = small_bpe(tasks.generate_tasks(100, 0, "train"))
    d = tmp_path_factory.mktemp("task_ckpts")
    return SimpleNamespace(student=write(small(1, vocab=400), d / "student", tok),
                           teacher=write(small(2, vocab=416, n_embd=32, head_scale=5.0), d / "teacher", tok))


def test_sft_on_policy_on_the_embedded_tasks_records_the_draws_and_a_resume_names_a_changed_lmbda(
        task_ckpts, tmp_path, capsys):
    from tritongpt.train import common

    out = tmp_path / "gkd"
    argv = ["sft", "--init", task_ckpts.student, "--out-dir", str(out), "--batch-size", "2", "--n-train", "12",
            "--n-eval", "2", "--tasks", "first_word", "--eval-every", "0", "--eval-gen", "0", "--sample-every", "0",
            "--max-new-tokens", "2", "--device", "cpu", "--kernels", "reference", "--log-every", "0",
            "--teacher", task_ckpts.teacher, "--distill-lmbda", "0.5", "--distill-max-new-tokens", "4",
            "--grad-accum", "2"]
    assert main([*argv, "--max-steps", "3"]) == 0
    r = [x for x in rows(out) if "distill_kd" in x]
    assert len(r) == 3 and all(x["distill_on_policy"] in (0, 1, 2) for x in r)
    assert 0 < sum(x["distill_on_policy"] for x in r) < 6  # seed 0's draws: some of the six micro-batches
    state = common.load_state(common.resume_checkpoint(out, "latest"))
    assert state["args"]["distill_lmbda"] == 0.5 and state["args"]["distill_max_new_tokens"] == 4
    assert "gkd_generator" in state["data"][0]
    capsys.readouterr()
    assert main([*argv[:-2], "--max-steps", "4", "--resume", "--distill-lmbda", "1"]) == 0
    err = capsys.readouterr().err
    assert "--distill-lmbda 1.0 (0.5)" in err
    last = [x for x in rows(out) if "distill_kd" in x]
    assert len(last) == 4 and last[-1]["distill_on_policy"] == 1  # grad-accum 1 now: its one micro-batch
    # --packing is refused before anything is written
    assert main(sft_argv(task_ckpts, tmp_path / "packed", "--max-steps", "1", "--teacher", task_ckpts.teacher,
                         "--distill-seq-kd", "--packing")) == 2
    assert "--distill-lmbda / --distill-seq-kd with --packing" in capsys.readouterr().err
    assert not (tmp_path / "packed").exists()


def test_a_resumed_on_policy_run_draws_as_the_uninterrupted_one(task_ckpts, tmp_path):
    def run(out, steps, *extra):
        assert main(sft_argv(task_ckpts, out, "--max-steps", str(steps), "--teacher", task_ckpts.teacher,
                             "--distill-lmbda", "0.5", "--distill-max-new-tokens", "3", "--ckpt-every", "2",
                             "--grad-accum", "2", *extra)) == 0
        return [(x["loss"], x["distill_on_policy"]) for x in rows(out) if "distill_kd" in x]

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "half", 2)
    resumed = run(tmp_path / "half", 4, "--resume")
    assert [d for _, d in whole] == [d for _, d in resumed] and len({d for _, d in whole}) > 1
    assert all(math.isclose(a, b, rel_tol=1e-5) for (a, _), (b, _) in zip(whole, resumed))


def test_a_checkpoint_from_before_the_flags_resumes_unnamed_at_their_defaults(task_ckpts, tmp_path, capsys):
    import torch as _torch

    from tritongpt.train import common

    out = tmp_path / "old"
    argv = sft_argv(task_ckpts, out, "--teacher", task_ckpts.teacher)
    assert main([*argv, "--max-steps", "1"]) == 0
    ck = common.Checkpointer(out).latest()
    state = common.load_state(ck)
    for k in distill.GKD_FLAGS:
        del state["args"][k]
    _torch.save(state, ck / "state.pt")
    capsys.readouterr()
    # the others, at their defaults now (no seq_kd, temperature 0.9, 128 tokens), are what that run did: unnamed
    assert main([*argv, "--max-steps", "2", "--resume", "--distill-lmbda", "0.5"]) == 0
    assert "resuming with --distill-lmbda 0.5, which " in capsys.readouterr().err


def test_no_mask_prompt_still_learns_only_the_students_own_tokens_on_its_batches():
    """--no-mask-prompt learns the data's prompts; a batch of the student's answers is GKD's on-policy term, over
    the tokens it sampled only (TRL's GKD loss: the tokens after the prompt), not the data's prompt it was given."""
    o = opts(lmbda=1.0, temperature=1.0, max_new=4)
    data = SFTData(examples(4), [], PAD, batch_size=4, mask_prompt=False, seed=4, rank=0, world_size=1)
    student, teacher = small(1, vocab=40, context=32), small(2, vocab=40, context=32)
    op = distill.OnPolicy(data, student, teacher, o, END, V, max_len=16, seed=4)
    plain = SFTData(examples(4), [], PAD, batch_size=4, seed=4, rank=0, world_size=1)
    g = torch.Generator().manual_seed(op.seed)
    for _ in range(2):
        batch = op.get_batch("train")
        torch.rand((), generator=g)
        check_batch(batch, expected(student, plain.next_examples(), o, g))
    # the data's own batches (lmbda 0) still learn the prompt
    op = distill.OnPolicy(SFTData(examples(4), [], PAD, 4, mask_prompt=False, seed=4, rank=0, world_size=1),
                          student, teacher, opts(lmbda=0.0), END, V, max_len=16, seed=4)
    inputs, targets = op.get_batch("train")[:2]
    assert (targets[:, 0] != -100).all()


def test_a_rank_new_at_the_resume_keeps_its_own_draws():
    """A resume on more ranks than the run had gives a new rank the last saved rank's data state (its position in
    the epoch); its GKD generator stays its own (--seed, rank) one, as the Trainer's does: two ranks drawing the
    same lmbda draws and sampling noise would not be the run's independent draws."""
    def op(rank):
        data = SFTData(examples(0), [], PAD, batch_size=2, seed=0, rank=rank, world_size=2)
        return distill.OnPolicy(data, None, None, opts(lmbda=0.5), END, V, max_len=16, seed=0, rank=rank)

    saved = op(0)
    torch.rand(7, generator=saved.generator)  # a run that has drawn
    old, new = op(0), op(1)
    fresh = new.generator.get_state()
    old.load_state_dict(saved.state_dict())
    new.load_state_dict(saved.state_dict())
    assert torch.equal(old.generator.get_state(), saved.generator.get_state())  # its own rank's: resumed
    assert torch.equal(new.generator.get_state(), fresh) and not torch.equal(fresh, saved.generator.get_state())
    assert new.data.epoch_seed == saved.data.epoch_seed  # the data's position is still taken over
    # rank 1's own state resumes on rank 1
    torch.rand(3, generator=new.generator)
    again = op(1)
    again.load_state_dict(new.state_dict())
    assert torch.equal(again.generator.get_state(), new.generator.get_state())


def test_cuda_graph_answers_are_the_eager_ones(monkeypatch):
    """OnPolicy(cuda_graph=True): the student's (lmbda) and the teacher's (seq_kd) answers generated with each
    decode step a graph replay (emulated on the CPU: tests/test_decode_graph.py's fx_capture) are the eager
    answers for the same seeds, one capture a prompt-length batch."""
    import tritongpt.train.generate as gen
    from test_decode_graph import fx_capture

    captured = []
    monkeypatch.setattr(gen, "capture_cuda_graph", lambda fn, device: captured.append(device) or fx_capture(fn))
    for o in (opts(lmbda=1.0, temperature=1.0, max_new=4), opts(lmbda=0.0, seq_kd=True, temperature=0.0)):
        _, _, _, eager = setup(o, seed=3)
        _, _, _, graphed = setup(o, seed=3)
        graphed.cuda_graph = True
        for _ in range(2):
            want, got = eager.get_batch("train"), graphed.get_batch("train")
            assert same_batch(want, got)
    assert captured


def test_cuda_graphs_are_refused_off_cuda_for_a_model_no_graph_replays_and_without_generation(task_ckpts, tmp_path,
                                                                                              capsys):
    _, _, _, op = setup(opts(), seed=0)
    op.cuda_graph = True
    with pytest.raises(UserError, match="--cuda-graphs replays the generated answers' decode steps as CUDA graphs: "
                                        "it needs a CUDA device, the run is on cpu"):
        op.place("cpu", torch.float32)
    data, _, teacher, _ = setup(opts(), seed=0)
    moe = small(1, vocab=40, context=32)
    moe.config.n_experts = 4  # (what check_graphable reads)
    with pytest.raises(UserError, match="does not take mixture-of-experts models"):
        distill.OnPolicy(data, moe, teacher, opts(), END, V, max_len=16, cuda_graph=True)
    argv = ["sft", "--init", task_ckpts.student, "--out-dir", str(tmp_path / "no"), "--batch-size", "2",
            "--n-train", "4", "--n-eval", "2", "--tasks", "first_word", "--device", "cpu", "--kernels", "reference",
            "--max-steps", "1", "--cuda-graphs"]
    assert main(argv) == 2
    assert "--cuda-graphs replays the decode steps of GKD's generated answers: it takes --teacher" in \
        capsys.readouterr().err
    assert main([*argv, "--teacher", task_ckpts.teacher, "--distill-lmbda", "1"]) == 2
    assert "it needs a CUDA device, the run is on cpu" in capsys.readouterr().err
